<?php

declare(strict_types=1);

namespace NotificationService\Tests\Laravel;

use Illuminate\Bus\BusServiceProvider;
use Illuminate\Config\Repository;
use Illuminate\Events\EventServiceProvider;
use Illuminate\Foundation\Application;
use Illuminate\Notifications\NotificationServiceProvider as LaravelNotificationServiceProvider;
use Illuminate\Queue\QueueServiceProvider;
use Illuminate\Support\Facades\Facade;
use NotificationService\Laravel\NotificationServiceProvider;
use NotificationService\Tests\ServerTestCase;

/**
 * A real Laravel application (Illuminate\Foundation\Application, as `bootstrap/app.php` makes it) with
 * the framework's event, bus, queue (the `sync` connection, which runs a job at once, serialized as any
 * queue would) and notification providers and this package's provider registered and booted,
 * configured for the test server as `.env` would configure it.
 */
abstract class LaravelTestCase extends ServerTestCase
{
    /** The application of the current test. */
    protected Application $app;

    protected function setUp(): void
    {
        parent::setUp();
        if (!class_exists(Application::class)) {
            self::requirement('Laravel is not installed (apt-get install php-laravel-framework, or composer install)');
        }
        $this->app = $this->makeApplication([
            'url' => $this->url,
            'api_key' => $this->apiKey,
        ]);
    }

    protected function tearDown(): void
    {
        Facade::clearResolvedInstances();
        Facade::setFacadeApplication(null);
        Application::setInstance(null);
    }

    /**
     * A booted application whose `notifications` config holds `$settings` (over the package's defaults).
     *
     * @param array<string, mixed> $settings
     */
    protected function makeApplication(array $settings): Application
    {
        $app = new Application(sys_get_temp_dir());
        $app->instance('config', new Repository([
            'notifications' => $settings,
            'queue' => ['default' => 'sync', 'connections' => ['sync' => ['driver' => 'sync']]],
        ]));
        $app->register(EventServiceProvider::class);
        $app->register(BusServiceProvider::class);
        $app->register(QueueServiceProvider::class);
        $app->register(LaravelNotificationServiceProvider::class);
        $app->register(NotificationServiceProvider::class);
        $app->boot();
        Facade::setFacadeApplication($app);
        return $app;
    }
}
