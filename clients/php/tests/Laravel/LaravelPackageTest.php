<?php

declare(strict_types=1);

namespace NotificationService\Tests\Laravel;

use Illuminate\Notifications\AnonymousNotifiable;
use Illuminate\Notifications\Events\NotificationSent;
use Illuminate\Queue\Events\JobProcessing;
use Illuminate\Queue\Jobs\SyncJob;
use Illuminate\Support\Facades\Notification as NotificationFacade;
use Illuminate\Support\ServiceProvider;
use NotificationService\ApiException;
use NotificationService\Client;
use NotificationService\Laravel\Facades\NotificationService;
use NotificationService\Laravel\NotificationServiceChannel;
use NotificationService\Laravel\NotificationServiceProvider;

require_once __DIR__ . '/Fixtures.php';

/**
 * The Laravel package in a real application: the provider, config and facade, and notifications sent
 * through the channel to the real server, checked in the user's history.
 */
final class LaravelPackageTest extends LaravelTestCase
{
    public function testTheProviderRegistersOneClientFromConfig(): void
    {
        $client = $this->app->make(Client::class);

        self::assertInstanceOf(Client::class, $client);
        self::assertSame($client, $this->app->make(Client::class), 'a singleton');
        self::assertSame($client, $this->app->make('notification-service'));
        self::assertSame(10.0, $this->app['config']->get('notifications.timeout'), 'the package defaults are merged');
        self::assertSame('auto', $this->app['config']->get('notifications.idempotency'));
    }

    public function testTheFacadeCallsTheServer(): void
    {
        $user = self::newUser();

        $sent = NotificationService::send(['user_id' => $user, 'message' => 'from the facade']);

        $history = NotificationService::history($user);
        self::assertSame($sent['id'], $history['notifications'][0]['id']);
        self::assertSame(1, NotificationService::markAllRead($user));
    }

    public function testTheConfigFileReadsEnvAndIsPublished(): void
    {
        $env = [
            'NOTIFICATIONS_URL' => 'http://notifications.internal:9000',
            'NOTIFICATIONS_API_KEY' => 'secret-key',
            'NOTIFICATIONS_TIMEOUT' => '2.5',
            'NOTIFICATIONS_RETRIES' => '4',
            'NOTIFICATIONS_IDEMPOTENCY' => 'null',
        ];
        foreach ($env as $name => $value) {
            putenv("{$name}={$value}");
        }
        try {
            $config = require NotificationServiceProvider::CONFIG_FILE;
        } finally {
            foreach (array_keys($env) as $name) {
                putenv($name);
            }
        }

        self::assertSame('http://notifications.internal:9000', $config['url']);
        self::assertSame('secret-key', $config['api_key']);
        self::assertSame(2.5, $config['timeout']);
        self::assertSame(4, $config['retries']);
        self::assertNull($config['idempotency']);
        self::assertSame(3.0, $config['connect_timeout'], 'the default');
        self::assertInstanceOf(Client::class, NotificationServiceProvider::clientFromConfig($config));

        $published = ServiceProvider::pathsToPublish(NotificationServiceProvider::class, NotificationServiceProvider::PUBLISH_TAG);
        self::assertSame([NotificationServiceProvider::CONFIG_FILE => $this->app->configPath('notifications.php')], $published);
    }

    public function testAMissingUrlOrABadSettingIsAClearError(): void
    {
        $app = $this->makeApplication(['url' => null]);
        try {
            $app->make(Client::class);
            self::fail('a client without a URL');
        } catch (\InvalidArgumentException $e) {
            self::assertStringContainsString('NOTIFICATIONS_URL', $e->getMessage());
        }

        $this->expectException(\InvalidArgumentException::class);
        $this->makeApplication(['url' => $this->url, 'retries' => -1])->make(Client::class);
    }

    public function testANotificationToAUserModelReachesItsInbox(): void
    {
        $user = new User(['id' => random_int(1_000_000, PHP_INT_MAX), 'name' => 'Ana']);
        $sent = [];
        $this->app['events']->listen(NotificationSent::class, static function (NotificationSent $event) use (&$sent): void {
            $sent[] = $event;
        });

        $user->notify(new TaskAssigned(456, 'Revisar el informe'));

        $history = $this->app->make(Client::class)->history($user->getKey());
        self::assertSame(1, $history['total']);
        $stored = $history['notifications'][0];
        self::assertSame((string) $user->getKey(), $stored['user_id']);
        self::assertSame('tarea', $stored['type']);
        self::assertSame('Nueva Tarea Asignada', $stored['title']);
        self::assertSame('Revisar el informe', $stored['message']);
        self::assertSame(['tareas'], $stored['channels']);
        self::assertSame(['task_id' => 456], $stored['data']);
        self::assertCount(1, $sent);
        self::assertSame('notification-service', $sent[0]->channel);
        self::assertSame($stored['id'], $sent[0]->response['id'], 'NotificationSent carries the server\'s answer');
    }

    public function testANotifiableRoutesItselfAndToArrayGivesTheFields(): void
    {
        $member = new TenantMember(bin2hex(random_bytes(4)));

        $member->notify(new InvoicePaid());

        $history = $this->app->make(Client::class)->history("tenant-7:{$member->memberId}");
        self::assertSame(1, $history['total']);
        self::assertSame('invoice', $history['notifications'][0]['type']);
        self::assertSame('Invoice paid', $history['notifications'][0]['message']);
    }

    public function testAnOnDemandNotificationGoesToTheRoutedUser(): void
    {
        $user = self::newUser();

        NotificationFacade::route('notification-service', $user)->notify(new TaskAssigned(1, 'on demand'));

        self::assertSame('on demand', $this->app->make(Client::class)->history($user)['notifications'][0]['message']);
    }

    public function testANotifiableWithoutAUserIsSkipped(): void
    {
        $channel = $this->app->make(NotificationServiceChannel::class);

        self::assertNull($channel->send(new AnonymousNotifiable(), new InvoicePaid()), 'no user, no channel, no broadcast');
    }

    public function testAQueuedNotificationWhoseJobRunsTwiceIsStoredOnce(): void
    {
        $member = new TenantMember(bin2hex(random_bytes(4)));
        $jobs = [];
        $this->app['events']->listen(JobProcessing::class, static function (JobProcessing $event) use (&$jobs): void {
            $jobs[] = $event->job->getRawBody();
        });

        $member->notify(new ReportReady());
        self::assertCount(1, $jobs, 'the notification went through the queue');
        // The queue runs the same job again, as after a worker timed out before it acknowledged it.
        (new SyncJob($this->app, $jobs[0], 'sync', 'default'))->fire();

        $history = $this->app->make(Client::class)->history("tenant-7:{$member->memberId}");
        self::assertSame(1, $history['total']);
        self::assertSame('Your report is ready', $history['notifications'][0]['message']);
        $member->notify(new ReportReady());
        self::assertSame(2, $this->app->make(Client::class)->history("tenant-7:{$member->memberId}")['total'], 'another notification is another');
    }

    public function testTheSameNotificationSentAgainIsStoredOnce(): void
    {
        // What a queued notification's job does when it is retried: Laravel gave the notification its
        // id when it was queued, and the retry sends it with that id again.
        $user = new User(['id' => random_int(1_000_000, PHP_INT_MAX)]);
        $notification = new TaskAssigned(9, 'queued once');
        $notification->id = 'b4f1c1d2-2f0a-4a57-9a4e-0d3c8f1e6a77';
        $other = new User(['id' => $user->getKey() + 1]);

        $user->notify($notification);
        $user->notify($notification);
        $other->notify($notification);

        $client = $this->app->make(Client::class);
        self::assertSame(1, $client->history($user->getKey())['total']);
        self::assertSame(1, $client->history($other->getKey())['total'], 'the same notification to another user is its own');
    }

    public function testARefusedNotificationThrowsTheApisError(): void
    {
        $user = new User(['id' => random_int(1_000_000, PHP_INT_MAX)]);

        try {
            $user->notify(new Malformed());
            self::fail('a notification without message must be refused');
        } catch (ApiException $e) {
            self::assertSame(400, $e->getStatusCode());
            self::assertSame('invalid_field', $e->getErrorCode());
            self::assertStringContainsString('message', $e->getMessage());
        }
    }
}
