<?php

declare(strict_types=1);

namespace NotificationService\Tests;

use NotificationService\Client;
use PHPUnit\Framework\TestCase;

/**
 * A test against the real server at NOTIFICATION_SERVICE_URL, which tests/php_client.rs starts with
 * NOTIFICATION_SERVICE_API_KEY as its API_KEY. Without that URL the test fails under CI=true and is
 * skipped elsewhere.
 */
abstract class ServerTestCase extends TestCase
{
    /** The server's base URL. */
    protected string $url;

    /** A key the server accepts. */
    protected ?string $apiKey;

    protected function setUp(): void
    {
        $url = getenv('NOTIFICATION_SERVICE_URL');
        if (!is_string($url) || $url === '') {
            self::requirement('NOTIFICATION_SERVICE_URL is not set (tests/php_client.rs starts a server and sets it)');
        }
        $this->url = $url;
        $key = getenv('NOTIFICATION_SERVICE_API_KEY');
        $this->apiKey = is_string($key) && $key !== '' ? $key : null;
    }

    /** A client of the test server. */
    protected function client(array $options = []): Client
    {
        return new Client($this->url, $this->apiKey, $options);
    }

    /** A user id no other test uses, so that inbox counts are this test's own. */
    protected static function newUser(): string
    {
        return 'php-' . bin2hex(random_bytes(6));
    }

    /** Fails under CI=true (where every tool and service must be there), else skips with the reason. */
    protected static function requirement(string $missing): void
    {
        if (in_array(getenv('CI'), ['true', '1'], true)) {
            self::fail("{$missing}, and CI=true requires it");
        }
        self::markTestSkipped($missing);
    }
}
