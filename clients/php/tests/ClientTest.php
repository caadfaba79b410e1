<?php

declare(strict_types=1);

namespace NotificationService\Tests;

use DateTimeImmutable;
use NotificationService\ApiException;
use NotificationService\Client;
use NotificationService\TransportException;

/**
 * Every method of the client against the real server, as a producer and an inbox UI would use them,
 * and the server's errors as ApiException.
 */
final class ClientTest extends ServerTestCase
{
    public function testASentNotificationIsInItsUsersHistory(): void
    {
        $user = self::newUser();
        $client = $this->client();

        $sent = $client->send([
            'user_id' => $user,
            'type' => 'tarea',
            'title' => 'Nueva Tarea Asignada',
            'message' => 'Se te ha asignado una tarea',
            'channels' => ['tareas'],
            'data' => ['task_id' => 456, 'priority' => 'high', 'ratio' => 1.0],
        ]);

        self::assertMatchesRegularExpression('/^[0-9a-f]{8}-[0-9a-f]{4}-7/', $sent['id']);
        self::assertMatchesRegularExpression('/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/', $sent['timestamp']);
        $history = $client->history($user);
        self::assertSame($user, $history['user_id']);
        self::assertSame(1, $history['total']);
        self::assertSame(1, $history['unread']);
        self::assertNull($history['next_before']);
        $stored = $history['notifications'][0];
        self::assertSame($sent['id'], $stored['id']);
        self::assertSame('tarea', $stored['type']);
        self::assertSame('Nueva Tarea Asignada', $stored['title']);
        self::assertSame(['tareas'], $stored['channels']);
        self::assertEquals(['task_id' => 456, 'priority' => 'high', 'ratio' => 1.0], $stored['data']);
        self::assertFalse($stored['read']);
    }

    public function testIntegerUserIdsAndAnEmptyDataArrayAreWhatLaravelSends(): void
    {
        $user = random_int(1_000_000, PHP_INT_MAX);
        $client = $this->client();

        $client->send(['user_id' => $user, 'message' => 'hola', 'data' => []]);

        $history = $client->history($user);
        self::assertSame((string) $user, $history['user_id']);
        self::assertSame([], $history['notifications'][0]['data']);
        self::assertSame('info', $history['notifications'][0]['type']);
    }

    public function testAUserIdIsOnePathSegmentWhateverItHolds(): void
    {
        $user = 'team/ü 1?x=' . bin2hex(random_bytes(3));
        $client = $this->client();

        $id = $client->send(['user_id' => $user, 'message' => 'hola'])['id'];

        self::assertSame($user, $client->history($user)['user_id']);
        self::assertSame($id, $client->markRead($user, $id)['id']);
        $client->delete($user, $id);
        self::assertSame(0, $client->history($user)['total']);
    }

    public function testABatchIsStoredInOrder(): void
    {
        $user = self::newUser();
        $client = $this->client();

        $ids = $client->batch([
            ['user_id' => $user, 'message' => 'first'],
            ['user_id' => $user, 'message' => 'second'],
            ['user_id' => $user, 'message' => 'third'],
        ])['ids'];

        self::assertCount(3, $ids);
        $history = $client->history($user);
        self::assertSame(array_reverse($ids), array_column($history['notifications'], 'id'), 'newest first');
        self::assertSame(['third', 'second', 'first'], array_column($history['notifications'], 'message'));
    }

    public function testAnInvalidBatchElementRefusesTheWholeBatch(): void
    {
        $user = self::newUser();
        $client = $this->client();

        try {
            $client->batch([['user_id' => $user, 'message' => 'fine'], ['user_id' => $user]]);
            self::fail('a batch with an element without message must be refused');
        } catch (ApiException $e) {
            self::assertSame(400, $e->getStatusCode());
            self::assertSame('invalid_field', $e->getErrorCode());
            self::assertStringContainsString('notifications[1].message', $e->getMessage());
        }
        self::assertSame(0, $client->history($user)['total']);
    }

    public function testHistoryPagesUnreadFilterAndReadMarks(): void
    {
        $user = self::newUser();
        $client = $this->client();
        $ids = $client->batch(array_map(
            static fn (int $n) => ['user_id' => $user, 'message' => "n{$n}"],
            range(1, 5),
        ))['ids'];

        $first = $client->history($user, ['limit' => 2]);
        self::assertSame([$ids[4], $ids[3]], array_column($first['notifications'], 'id'));
        self::assertSame($ids[3], $first['next_before']);
        $second = $client->history($user, ['limit' => 2, 'before' => $first['next_before']]);
        self::assertSame([$ids[2], $ids[1]], array_column($second['notifications'], 'id'));
        self::assertSame(5, $second['total']);

        $read = $client->markRead($user, $ids[0]);
        self::assertSame($ids[0], $read['id']);
        self::assertTrue($read['read']);
        self::assertNotNull($read['read_at']);
        self::assertSame($read['read_at'], $client->markRead($user, $ids[0])['read_at'], 'marking twice keeps the first read_at');

        $unread = $client->history($user, ['unread' => true]);
        self::assertSame(4, $unread['unread']);
        self::assertNotContains($ids[0], array_column($unread['notifications'], 'id'));
        self::assertCount(5, $client->history($user, ['unread' => false, 'before' => null])['notifications']);

        self::assertSame(4, $client->markAllRead($user));
        self::assertSame(0, $client->markAllRead($user));
        self::assertSame(0, $client->history($user)['unread']);
    }

    public function testADeletedNotificationLeavesTheInbox(): void
    {
        $user = self::newUser();
        $client = $this->client();
        $keep = $client->send(['user_id' => $user, 'message' => 'keep'])['id'];
        $gone = $client->send(['user_id' => $user, 'message' => 'gone'])['id'];

        $client->delete($user, $gone);

        self::assertSame([$keep], array_column($client->history($user)['notifications'], 'id'));
        $this->assertApiError(404, 'not_found', static fn () => $client->delete($user, $gone));
    }

    public function testAScheduleIsPendingUntilCancelled(): void
    {
        $user = self::newUser();
        $client = $this->client();
        $at = new DateTimeImmutable('+1 hour');

        $schedule = $client->schedule(['user_id' => $user, 'message' => 'later', 'scheduled_at' => $at]);

        self::assertSame($user, $schedule['user_id']);
        self::assertSame($at->getTimestamp(), (new DateTimeImmutable($schedule['scheduled_at']))->getTimestamp());
        $pending = $client->getScheduled($schedule['id']);
        self::assertSame('pending', $pending['state']);
        self::assertSame('later', $pending['message']);
        self::assertSame(0, $client->history($user)['total'], 'a pending schedule is in no history');

        $client->cancelScheduled($schedule['id']);

        $this->assertApiError(404, 'not_found', static fn () => $client->getScheduled($schedule['id']));
        $this->assertApiError(404, 'not_found', static fn () => $client->cancelScheduled($schedule['id']));
    }

    public function testAScheduleInThePastFiresAtOnceAsANotificationOfItsOwn(): void
    {
        $user = self::newUser();
        $client = $this->client();

        // The string form Carbon's toAtomString() writes.
        $schedule = $client->schedule([
            'user_id' => $user,
            'message' => 'now',
            'scheduled_at' => (new DateTimeImmutable('-1 minute'))->format(DATE_ATOM),
        ]);

        $fired = self::eventually('the schedule to fire', static function () use ($client, $schedule): ?array {
            $state = $client->getScheduled($schedule['id']);
            return $state['state'] === 'fired' ? $state : null;
        });
        self::assertSame($schedule['id'], $fired['id']);
        self::assertNotSame($schedule['id'], $fired['notification_id']);
        $stored = $client->history($user)['notifications'][0];
        self::assertSame($fired['notification_id'], $stored['id']);
        self::assertSame($schedule['id'], $stored['schedule_id']);
        $this->assertApiError(404, 'not_found', static fn () => $client->cancelScheduled($schedule['id']));
    }

    public function testTheSameIdempotencyKeyStoresOnceAndAnswersTheSame(): void
    {
        $user = self::newUser();
        $client = $this->client();
        $key = 'tarea-' . bin2hex(random_bytes(8)) . '-creada';
        $notification = ['user_id' => $user, 'message' => 'once'];

        $first = $client->send($notification, $key);
        $again = $client->send($notification, $key);

        self::assertSame($first, $again);
        self::assertSame(1, $client->history($user)['total']);
        $this->assertApiError(422, 'idempotency_key_reused', static fn () => $client->send(['user_id' => $user, 'message' => 'other'], $key));
        self::assertSame(1, $client->history($user)['total']);
        $batchKey = "{$key}-batch";
        self::assertSame($client->batch([$notification], $batchKey), $client->batch([$notification], $batchKey));
        self::assertSame(2, $client->history($user)['total']);
    }

    public function testAutoIdempotencyStoresEachCallOnce(): void
    {
        $user = self::newUser();
        $client = $this->client(['idempotency' => 'auto']);

        $a = $client->send(['user_id' => $user, 'message' => 'same']);
        $b = $client->send(['user_id' => $user, 'message' => 'same']);

        self::assertNotSame($a['id'], $b['id'], 'two calls are two notifications, each with a key of its own');
        self::assertSame(2, $client->history($user)['total']);
    }

    public function testInvalidInputIs400WithTheApisCode(): void
    {
        $client = $this->client();

        $this->assertApiError(400, 'invalid_field', static fn () => $client->send(['user_id' => 'u1']), 'message');
        $this->assertApiError(400, 'no_target', static fn () => $client->send(['message' => 'to nobody']));
        $this->assertApiError(400, 'invalid_field', static fn () => $client->send(['user_id' => 'u1', 'message' => 'x', 'data' => ['a', 'b']]), 'data');
        $this->assertApiError(400, 'invalid_field', static fn () => $client->schedule(['user_id' => 'u1', 'message' => 'x']), 'scheduled_at');
        $this->assertApiError(400, 'invalid_field', static fn () => $client->send(['user_id' => 'u1', 'message' => 'x'], 'has space'));
        $this->assertApiError(400, 'invalid_field', static fn () => $client->send(['user_id' => 'u1', 'message' => 'x'], str_repeat('k', 256)));
        $this->assertApiError(400, 'invalid_field', static fn () => $client->history('u1', ['limit' => 0]));
        $this->assertApiError(400, 'invalid_field', static fn () => $client->markRead('u1', 'not-a-uuid'));
    }

    public function testUnknownIdsAre404(): void
    {
        $client = $this->client();
        $unknown = '0190b3c4-0000-7000-8000-000000000001';

        $this->assertApiError(404, 'not_found', static fn () => $client->markRead(self::newUser(), $unknown));
        $this->assertApiError(404, 'not_found', static fn () => $client->delete(self::newUser(), $unknown));
        $this->assertApiError(404, 'not_found', static fn () => $client->getScheduled($unknown));
    }

    public function testAWrongOrMissingApiKeyIs401(): void
    {
        if ($this->apiKey === null) {
            self::requirement('NOTIFICATION_SERVICE_API_KEY is not set (the server must have API_KEY)');
        }
        $wrong = new Client($this->url, 'not-' . $this->apiKey);
        $none = new Client($this->url);

        $this->assertApiError(401, 'unauthorized', static fn () => $wrong->send(['user_id' => 'u1', 'message' => 'x']));
        $this->assertApiError(401, 'unauthorized', static fn () => $none->history('u1'));
    }

    public function testAServerThatIsNotThereIsATransportError(): void
    {
        $client = new Client('http://127.0.0.1:' . StubServer::freePort(), $this->apiKey, ['retries' => 0]);

        $this->expectException(TransportException::class);
        $client->history('u1');
    }

    /**
     * Asserts that `$call` throws an ApiException with this status and code, and a message that
     * contains `$mentions`.
     */
    private function assertApiError(int $status, string $code, callable $call, string $mentions = ''): void
    {
        try {
            $call();
        } catch (ApiException $e) {
            self::assertSame([$status, $code], [$e->getStatusCode(), $e->getErrorCode()], $e->getMessage());
            self::assertNotSame('', $e->getMessage());
            self::assertStringContainsString($mentions, $e->getMessage());
            self::assertSame($code, $e->getBody()['error']['code']);
            return;
        }
        self::fail("expected {$status} {$code}, and the call succeeded");
    }

    /**
     * Polls `$check` until it returns non-null (the server's scheduler ticks every 100 ms).
     *
     * @template T
     * @param callable(): ?T $check
     * @return T
     */
    private static function eventually(string $what, callable $check)
    {
        $deadline = microtime(true) + 10;
        while (($value = $check()) === null) {
            if (microtime(true) > $deadline) {
                self::fail("timed out waiting for {$what}");
            }
            usleep(50_000);
        }
        return $value;
    }
}
