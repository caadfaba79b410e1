<?php

declare(strict_types=1);

namespace NotificationService\Tests;

use NotificationService\ApiException;
use NotificationService\Client;
use NotificationService\NotificationServiceException;
use NotificationService\TransportException;
use PHPUnit\Framework\TestCase;

/**
 * Retries, backoff and timeouts, against the scripted stub server (the real server cannot be made to
 * answer 503 or stall on cue): what is retried, how often, after how long, and with which key.
 *
 * @group stub
 */
final class RetryTest extends TestCase
{
    private const STORE_UNAVAILABLE = [
        'status' => 503,
        'body' => ['error' => ['code' => 'store_unavailable', 'message' => 'the store did not answer']],
    ];

    private const CREATED = [
        'status' => 201,
        'body' => ['id' => '0190b3c4-0000-7000-8000-000000000001', 'timestamp' => '2026-01-29T10:30:00.000Z'],
    ];

    private const NOTIFICATION = ['user_id' => 42, 'message' => 'hola'];

    /** The stub of the current test, stopped after it. */
    private ?StubServer $stub = null;

    protected function tearDown(): void
    {
        $this->stub?->stop();
    }

    /**
     * A client of a stub answering `$answers`; `$retries` collects each retry's number and delay.
     */
    private function client(array $answers, array $options = [], ?array &$retries = null): Client
    {
        $this->stub = new StubServer($answers);
        $retries = [];
        $options += [
            'retry_delay' => 0.05,
            'on_retry' => static function (int $retry, float $delay, NotificationServiceException $cause) use (&$retries): void {
                $retries[] = ['retry' => $retry, 'delay' => $delay, 'cause' => $cause];
            },
        ];
        return new Client($this->stub->url, 'stub-key', $options);
    }

    public function testASendWithAKeyIsRetriedAfter503WithTheSameKeyAndBody(): void
    {
        $client = $this->client([self::STORE_UNAVAILABLE, self::CREATED], [], $retries);

        $answer = $client->send(self::NOTIFICATION, 'order-7-shipped');

        self::assertSame(self::CREATED['body'], $answer);
        $requests = $this->stub->requests();
        self::assertCount(2, $requests);
        foreach ($requests as $request) {
            self::assertSame('POST', $request['method']);
            self::assertSame('/api/v1/notifications/send', $request['uri']);
            self::assertSame('order-7-shipped', $request['headers']['idempotency-key']);
            self::assertSame('Bearer stub-key', $request['headers']['authorization']);
            self::assertSame('{"user_id":42,"message":"hola"}', $request['body']);
        }
        self::assertCount(1, $retries);
        self::assertSame(1, $retries[0]['retry']);
        self::assertSame(503, $retries[0]['cause']->getStatusCode());
        // Equal jitter: the first wait is between half the base delay and the base delay.
        self::assertGreaterThanOrEqual(0.025, $retries[0]['delay']);
        self::assertLessThanOrEqual(0.05, $retries[0]['delay']);
    }

    public function testASendWithoutAKeyIsNotRetried(): void
    {
        $client = $this->client([self::STORE_UNAVAILABLE, self::CREATED], [], $retries);

        try {
            $client->send(self::NOTIFICATION);
            self::fail('a 503 without a key must be thrown, not retried');
        } catch (ApiException $e) {
            self::assertSame(503, $e->getStatusCode());
            self::assertSame('store_unavailable', $e->getErrorCode());
            self::assertSame('the store did not answer', $e->getMessage());
        }
        self::assertCount(1, $this->stub->requests());
        self::assertArrayNotHasKey('idempotency-key', $this->stub->requests()[0]['headers']);
        self::assertSame([], $retries);
    }

    public function testAutoIdempotencyGivesEachSendAKeyOfItsOwnKeptAcrossItsRetries(): void
    {
        $client = $this->client([self::STORE_UNAVAILABLE, self::CREATED], ['idempotency' => 'auto']);

        $client->send(self::NOTIFICATION);
        $client->batch([self::NOTIFICATION]);
        $client->schedule(self::NOTIFICATION + ['scheduled_at' => new \DateTimeImmutable('2026-01-29 17:00:00', new \DateTimeZone('-05:00'))]);

        $requests = $this->stub->requests();
        self::assertCount(4, $requests, 'the first send is retried once; the others succeed at once');
        $keys = array_map(static fn (array $r) => $r['headers']['idempotency-key'] ?? null, $requests);
        self::assertMatchesRegularExpression('/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/', (string) $keys[0]);
        self::assertSame($keys[0], $keys[1], 'a retry carries the same key');
        self::assertCount(3, array_unique($keys), 'each call has its own key');
        self::assertSame('{"notifications":[{"user_id":42,"message":"hola"}]}', $requests[2]['body']);
        self::assertSame('2026-01-29T17:00:00.000-05:00', json_decode($requests[3]['body'], true)['scheduled_at']);
    }

    public function testReadsAreRetriedWithGrowingBackoffUntilTheyGiveUp(): void
    {
        $client = $this->client([self::STORE_UNAVAILABLE], ['retries' => 3], $retries);

        try {
            $client->history('u1', ['limit' => 5, 'unread' => true]);
            self::fail('a 503 that lasts must be thrown once the retries are spent');
        } catch (ApiException $e) {
            self::assertSame(503, $e->getStatusCode());
        }
        self::assertCount(4, $this->stub->requests(), 'one attempt and three retries');
        self::assertSame('/api/v1/notifications/user/u1?limit=5&unread=true', $this->stub->requests()[0]['uri']);
        self::assertSame([1, 2, 3], array_column($retries, 'retry'));
        foreach ($retries as $i => $retry) {
            $ceiling = 0.05 * 2 ** $i;
            self::assertGreaterThanOrEqual($ceiling / 2, $retry['delay']);
            self::assertLessThanOrEqual($ceiling, $retry['delay']);
        }
    }

    public function testRetryAfterIsHonouredUpToTheLongestBackoff(): void
    {
        $busy = self::STORE_UNAVAILABLE + ['headers' => ['Content-Type' => 'application/json', 'Retry-After' => '30']];
        $client = $this->client([$busy, ['status' => 200, 'body' => ['updated' => 3]]], ['max_retry_delay' => 0.2], $retries);

        self::assertSame(3, $client->markAllRead(7));
        self::assertSame(0.2, $retries[0]['delay']);
        self::assertSame(30, $retries[0]['cause']->getRetryAfter());
        self::assertSame('PUT', $this->stub->requests()[1]['method']);
        self::assertSame('/api/v1/notifications/7/read-all', $this->stub->requests()[1]['uri']);
    }

    public function testOther4xxAnswersAreNotRetried(): void
    {
        $notFound = ['status' => 404, 'body' => ['error' => ['code' => 'not_found', 'message' => 'no such notification']]];
        $client = $this->client([$notFound, self::CREATED], [], $retries);

        try {
            $client->markRead('u1', '0190b3c4-0000-7000-8000-000000000001');
            self::fail('404 must be thrown');
        } catch (ApiException $e) {
            self::assertSame(404, $e->getStatusCode());
            self::assertSame('not_found', $e->getErrorCode());
        }
        self::assertCount(1, $this->stub->requests());
        self::assertSame([], $retries);
    }

    public function testAnAnswerWithoutTheApisErrorShapeIsAnUnexpectedResponse(): void
    {
        $client = $this->client([['status' => 502, 'body' => '<html>Bad Gateway</html>', 'headers' => ['Content-Type' => 'text/html']]]);

        try {
            $client->send(self::NOTIFICATION);
            self::fail('502 must be thrown');
        } catch (ApiException $e) {
            self::assertSame(502, $e->getStatusCode());
            self::assertSame(ApiException::UNEXPECTED_RESPONSE, $e->getErrorCode());
            self::assertStringContainsString('Bad Gateway', $e->getMessage());
            self::assertNull($e->getBody());
        }
    }

    public function testTheTotalTimeoutEndsAStalledAnswer(): void
    {
        $client = $this->client([self::CREATED + ['sleep' => 3.0]], ['timeout' => 0.3, 'retries' => 0]);

        try {
            $client->send(self::NOTIFICATION, 'k1');
            self::fail('a stalled answer must time out');
        } catch (TransportException $e) {
            self::assertTrue($e->isTimeout(), $e->getMessage());
        }
    }

    public function testTheConnectTimeoutEndsAConnectionTheServerDoesNotAccept(): void
    {
        // A listening socket whose accept queue (backlog 0) is full: the kernel drops further SYNs, so
        // the client's connect hangs, as with a host that is down.
        $context = stream_context_create(['socket' => ['backlog' => 0]]);
        $server = stream_socket_server('tcp://127.0.0.1:0', $errno, $error, STREAM_SERVER_BIND | STREAM_SERVER_LISTEN, $context);
        $address = stream_socket_get_name($server, false);
        $queued = [];
        for ($i = 0; $i < 4; $i++) {
            $queued[] = @stream_socket_client("tcp://{$address}", $errno, $error, 0.2, STREAM_CLIENT_CONNECT | STREAM_CLIENT_ASYNC_CONNECT);
        }
        $client = new Client("http://{$address}", null, ['connect_timeout' => 0.3, 'timeout' => 30, 'retries' => 0]);

        try {
            $client->history('u1');
            self::fail('a connection that is never accepted must time out');
        } catch (TransportException $e) {
            self::assertTrue($e->isTimeout(), $e->getMessage());
            self::assertStringContainsString('connect', $e->getMessage(), 'the connect timeout, not the total one');
        } finally {
            fclose($server);
        }
    }

    public function testATimedOutSendWithAKeyIsRetriedAndTheRetryGetsTheAnswer(): void
    {
        $client = $this->client([self::CREATED + ['sleep' => 3.0], self::CREATED], ['timeout' => 0.3], $retries);

        self::assertSame(self::CREATED['body'], $client->send(self::NOTIFICATION, 'k2'));
        self::assertCount(1, $retries);
        self::assertInstanceOf(TransportException::class, $retries[0]['cause']);
        self::assertTrue($retries[0]['cause']->isTimeout());
    }

    public function testARefusedConnectionIsRetriedForReadsAndNotForSendsWithoutAKey(): void
    {
        $retries = [];
        $options = [
            'retries' => 2,
            'retry_delay' => 0.01,
            'on_retry' => static function (int $retry) use (&$retries): void {
                $retries[] = $retry;
            },
        ];
        $client = new Client('http://127.0.0.1:' . StubServer::freePort(), null, $options);

        try {
            $client->getScheduled('0190b3c4-0000-7000-8000-000000000001');
            self::fail('nothing listens there');
        } catch (TransportException $e) {
            self::assertFalse($e->isTimeout());
            self::assertSame(7, $e->getCode(), 'CURLE_COULDNT_CONNECT');
        }
        self::assertSame([1, 2], $retries);

        $retries = [];
        $this->expectException(TransportException::class);
        try {
            $client->send(self::NOTIFICATION);
        } finally {
            self::assertSame([], $retries);
        }
    }

    public function testBadOptionsAreRefused(): void
    {
        foreach ([['timout' => 1], ['timeout' => 0], ['retries' => -1], ['retries' => 1.5], ['idempotency' => 'yes'], ['on_retry' => 'no such function']] as $options) {
            try {
                new Client('http://127.0.0.1:1', null, $options);
                self::fail('accepted ' . json_encode($options));
            } catch (\InvalidArgumentException $e) {
                self::assertNotSame('', $e->getMessage());
            }
        }
        try {
            (new Client('http://127.0.0.1:1'))->send(['user_id' => 'u1', 'message' => 'x'], "k\r\nX-Injected: 1");
            self::fail('a line break in a header value must be refused');
        } catch (\InvalidArgumentException $e) {
            self::assertStringContainsString('idempotency key', $e->getMessage());
        }
        $this->expectException(\InvalidArgumentException::class);
        new Client('notification-service:8080');
    }
}
