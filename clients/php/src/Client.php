<?php

declare(strict_types=1);

namespace NotificationService;

use CurlHandle;
use DateTimeInterface;
use InvalidArgumentException;
use JsonException;

/**
 * The PHP client of notification-service's REST API (docs/API.md): send, batch and schedule
 * notifications, and read and manage a user's inbox.
 *
 * It needs nothing but ext-curl and ext-json. One curl handle is kept per client, so the calls of one
 * request cycle (a Laravel request, a queue job) reuse one keep-alive connection.
 *
 * Failures are of two kinds, both implementing {@see NotificationServiceException}: the server's answer
 * with an error status ({@see ApiException}, carrying the API's status and `error.code`), and no answer
 * at all ({@see TransportException}: refused, reset, timed out).
 *
 * Retries: a 503 (`store_unavailable`, `too_many_connections`) or a transport failure is retried with
 * exponential backoff and jitter, but only where a retry cannot store a notification twice: reads,
 * marks and deletes always, sends, batches and schedules only when they carry an `Idempotency-Key`
 * (the server then answers a retry with the first answer and stores nothing). With the option
 * `'idempotency' => 'auto'` the client gives every send, batch and schedule a random key of its own.
 */
class Client
{
    /** The version sent in the User-Agent header. */
    public const VERSION = '0.1.0';

    /**
     * Every option and its default. Unknown option names are refused, so a misspelt one is not
     * silently ignored.
     */
    private const DEFAULTS = [
        // Seconds to wait for the TCP (and TLS) connection to open.
        'connect_timeout' => 3.0,
        // Seconds one attempt may take in all, connecting included.
        'timeout' => 10.0,
        // How many times a retryable failure is tried again (0: never).
        'retries' => 2,
        // The first backoff in seconds; it doubles with each retry.
        'retry_delay' => 0.2,
        // The longest backoff in seconds, also the cap on a server's Retry-After.
        'max_retry_delay' => 5.0,
        // null: sends carry only the keys the caller gives; 'auto': a random key for every send,
        // batch and schedule the caller gives none, so that they are retried safely.
        'idempotency' => null,
        // Called before each retry as fn(int $retry, float $delaySeconds, NotificationServiceException $cause).
        'on_retry' => null,
        // The User-Agent header.
        'user_agent' => 'notification-service-php/' . self::VERSION,
    ];

    /** curl error numbers after which the request may not have reached the server, or its answer was lost. */
    private const RETRYABLE_CURL_ERRORS = [
        6,  // CURLE_COULDNT_RESOLVE_HOST (a DNS hiccup, or a container not up yet)
        7,  // CURLE_COULDNT_CONNECT
        28, // CURLE_OPERATION_TIMEDOUT
        52, // CURLE_GOT_NOTHING (a keep-alive connection the server had closed)
        55, // CURLE_SEND_ERROR
        56, // CURLE_RECV_ERROR (reset)
    ];

    /** The URL the API's paths are appended to, without a trailing slash. */
    private string $baseUrl;

    /** Sent as `Authorization: Bearer`, when the server has `API_KEY` set. */
    private ?string $apiKey;

    /** The options, validated and merged with {@see self::DEFAULTS}. */
    private array $options;

    /** Reused between requests for keep-alive; created on first use. */
    private ?CurlHandle $curl = null;

    /**
     * @param string $baseUrl the server, e.g. `http://notification-service:8080` (a path prefix is kept,
     *                        for a server behind a proxy at `/notifications`)
     * @param string|null $apiKey one of the server's `API_KEY` keys, or null for a server without keys
     * @param array{connect_timeout?: float|int, timeout?: float|int, retries?: int, retry_delay?: float|int,
     *     max_retry_delay?: float|int, idempotency?: 'auto'|null, on_retry?: callable|null,
     *     user_agent?: string} $options see {@see self::DEFAULTS}
     *
     * @throws InvalidArgumentException for a URL that is not http(s), an unknown option or a bad value
     */
    public function __construct(string $baseUrl, ?string $apiKey = null, array $options = [])
    {
        $scheme = parse_url($baseUrl, PHP_URL_SCHEME);
        if (!in_array(is_string($scheme) ? strtolower($scheme) : null, ['http', 'https'], true)
            || parse_url($baseUrl, PHP_URL_HOST) === null) {
            throw new InvalidArgumentException("the base URL must be an http:// or https:// URL, got \"{$baseUrl}\"");
        }
        $this->baseUrl = rtrim($baseUrl, '/');
        $this->apiKey = $apiKey === '' ? null : self::headerValue($apiKey, 'API key');
        $this->options = self::validateOptions($options);
    }

    /**
     * Stores one notification and delivers it live to its targets.
     *
     * @param array<string, mixed> $notification the API's fields: `message` (required), `user_id`,
     *                                           `channels`, `broadcast`, `type`, `title`, `data`
     * @param string|null $idempotencyKey 1 to 255 visible ASCII characters; the same key with the same
     *                                    body within 24 h returns the first answer and stores nothing
     *
     * @return array{id: string, timestamp: string}
     *
     * @throws ApiException e.g. 400 `invalid_field`, `no_target`; 422 `idempotency_key_reused`
     * @throws TransportException
     */
    public function send(array $notification, ?string $idempotencyKey = null): array
    {
        return $this->post('/api/v1/notifications/send', $notification, $idempotencyKey);
    }

    /**
     * Stores up to 1,000 notifications all-or-nothing and delivers them.
     *
     * @param list<array<string, mixed>> $notifications each as for {@see send()}
     *
     * @return array{ids: list<string>} the ids in the order given
     *
     * @throws ApiException 400 naming the first invalid element (`notifications[3].message is required`);
     *                      nothing is stored then
     * @throws TransportException
     */
    public function batch(array $notifications, ?string $idempotencyKey = null): array
    {
        return $this->post('/api/v1/notifications/batch', ['notifications' => array_values($notifications)], $idempotencyKey);
    }

    /**
     * Schedules a notification for `scheduled_at` (a time in the past fires at once).
     *
     * @param array<string, mixed> $notification as for {@see send()}, plus `scheduled_at`: an RFC 3339
     *                                           string or a DateTimeInterface (a Carbon instance is one)
     *
     * @return array{id: string, user_id: ?string, scheduled_at: string, created_at: string} `id` names the
     *         schedule (for {@see getScheduled()} and {@see cancelScheduled()}); the notification it fires
     *         gets an id of its own
     *
     * @throws ApiException 400 `invalid_field` for a missing or unparsable `scheduled_at`, or one over a year ahead
     * @throws TransportException
     */
    public function schedule(array $notification, ?string $idempotencyKey = null): array
    {
        if (($notification['scheduled_at'] ?? null) instanceof DateTimeInterface) {
            $notification['scheduled_at'] = $notification['scheduled_at']->format(DATE_RFC3339_EXTENDED);
        }
        return $this->post('/api/v1/notifications/schedule', $notification, $idempotencyKey);
    }

    /**
     * A schedule by the id {@see schedule()} answered: while pending, its notification with
     * `'state' => 'pending'`; once fired, `['id', 'state' => 'fired', 'notification_id', 'user_id',
     * 'scheduled_at', 'fired_at']`.
     *
     * @return array<string, mixed>
     *
     * @throws ApiException 404 `not_found` once cancelled or unknown; 400 if the id is not a UUID
     * @throws TransportException
     */
    public function getScheduled(string $id): array
    {
        return $this->request('GET', '/api/v1/notifications/scheduled/' . self::segment($id, 'id'));
    }

    /**
     * Cancels a schedule that has not fired yet.
     *
     * @throws ApiException 404 `not_found` once it has fired or was cancelled; 400 if the id is not a UUID
     * @throws TransportException
     */
    public function cancelScheduled(string $id): void
    {
        $this->request('DELETE', '/api/v1/notifications/scheduled/' . self::segment($id, 'id'));
    }

    /**
     * One page of a user's inbox, newest first.
     *
     * @param array{limit?: int, before?: string|null, unread?: bool} $query `before`: the previous page's
     *                                                                        `next_before`; `unread`: only unread ones
     *
     * @return array{user_id: string, notifications: list<array<string, mixed>>, total: int, unread: int,
     *     next_before: ?string}
     *
     * @throws ApiException 400 for a `limit` of 0 or not a number
     * @throws TransportException
     */
    public function history(string|int $userId, array $query = []): array
    {
        $params = [];
        foreach ($query as $name => $value) {
            if ($value === null) {
                continue;
            }
            $params[$name] = is_bool($value) ? ($value ? 'true' : 'false') : (string) $value;
        }
        $path = '/api/v1/notifications/user/' . self::segment((string) $userId, 'user id');
        if ($params !== []) {
            $path .= '?' . http_build_query($params, '', '&', PHP_QUERY_RFC3986);
        }
        return $this->request('GET', $path);
    }

    /**
     * Marks one notification of the user read (again is harmless: the first `read_at` stays).
     *
     * @return array<string, mixed> the notification
     *
     * @throws ApiException 404 if that id is not in that user's inbox; 400 if it is not a UUID
     * @throws TransportException
     */
    public function markRead(string|int $userId, string $id): array
    {
        return $this->request('PUT', self::inbox($userId) . '/' . self::segment($id, 'id') . '/read');
    }

    /**
     * Marks every notification of the user read.
     *
     * @return int how many were unread
     *
     * @throws ApiException
     * @throws TransportException
     */
    public function markAllRead(string|int $userId): int
    {
        return (int) $this->request('PUT', self::inbox($userId) . '/read-all')['updated'];
    }

    /**
     * Deletes a notification from the user's inbox (it is then neither in history nor replayed).
     *
     * @throws ApiException 404 if that id is not in that user's inbox (also when a retry after a lost
     *                      answer finds it already deleted); 400 if it is not a UUID
     * @throws TransportException
     */
    public function delete(string|int $userId, string $id): void
    {
        $this->request('DELETE', self::inbox($userId) . '/' . self::segment($id, 'id'));
    }

    /**
     * A POST of a JSON body, with the caller's idempotency key or, under `'idempotency' => 'auto'`, one
     * of the client's; retried only with a key.
     */
    private function post(string $path, array $body, ?string $idempotencyKey): array
    {
        if ($idempotencyKey === null && $this->options['idempotency'] === 'auto') {
            $idempotencyKey = self::randomKey();
        }
        return $this->request('POST', $path, $body, $idempotencyKey);
    }

    /**
     * One API call, with its retries: the decoded JSON answer of a 2xx (an empty array for a 204).
     *
     * @throws ApiException
     * @throws TransportException
     */
    private function request(string $method, string $path, ?array $body = null, ?string $idempotencyKey = null): array
    {
        // A POST without a key may have been stored although its answer was lost, or although it was a
        // 503 because PostgreSQL's answer to COMMIT went missing: retrying it could store it twice.
        $retryable = $method !== 'POST' || $idempotencyKey !== null;
        $payload = $body === null ? null : self::encode($body);
        for ($retry = 0; ; $retry++) {
            try {
                return $this->attempt($method, $path, $payload, $idempotencyKey);
            } catch (ApiException | TransportException $failure) {
                if (!$retryable || $retry >= $this->options['retries'] || !self::isRetryable($failure)) {
                    throw $failure;
                }
                $delay = $this->backoff($retry, $failure);
                if ($this->options['on_retry'] !== null) {
                    ($this->options['on_retry'])($retry + 1, $delay, $failure);
                }
                usleep((int) round($delay * 1_000_000));
            }
        }
    }

    /**
     * One HTTP exchange.
     *
     * @throws ApiException for a status of 300 or more, or a 2xx whose body is not JSON
     * @throws TransportException when no answer came
     */
    private function attempt(string $method, string $path, ?string $payload, ?string $idempotencyKey): array
    {
        $headers = ['Accept: application/json', 'Expect:'];
        if ($this->apiKey !== null) {
            $headers[] = 'Authorization: Bearer ' . $this->apiKey;
        }
        if ($idempotencyKey !== null) {
            $headers[] = 'Idempotency-Key: ' . self::headerValue($idempotencyKey, 'idempotency key');
        }
        if ($payload !== null) {
            $headers[] = 'Content-Type: application/json';
        }
        $responseHeaders = [];
        $curl = $this->curl ??= curl_init();
        curl_reset($curl);
        curl_setopt_array($curl, [
            CURLOPT_URL => $this->baseUrl . $path,
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_HTTPHEADER => $headers,
            CURLOPT_USERAGENT => $this->options['user_agent'],
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_CONNECTTIMEOUT_MS => (int) ceil($this->options['connect_timeout'] * 1000),
            CURLOPT_TIMEOUT_MS => (int) ceil($this->options['timeout'] * 1000),
            CURLOPT_NOSIGNAL => true,
            CURLOPT_HEADERFUNCTION => static function ($handle, string $line) use (&$responseHeaders): int {
                $parts = explode(':', $line, 2);
                if (count($parts) === 2) {
                    $responseHeaders[strtolower(trim($parts[0]))] = trim($parts[1]);
                }
                return strlen($line);
            },
        ]);
        if ($payload !== null) {
            curl_setopt($curl, CURLOPT_POSTFIELDS, $payload);
        }
        $raw = curl_exec($curl);
        if ($raw === false) {
            $errno = curl_errno($curl);
            throw new TransportException(
                sprintf('%s %s failed: %s', $method, $this->baseUrl . $path, curl_error($curl)),
                $errno,
            );
        }
        $status = (int) curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        if ($status === 204) {
            return [];
        }
        $decoded = null;
        if ($raw !== '') {
            try {
                $decoded = json_decode($raw, true, 512, JSON_THROW_ON_ERROR | JSON_BIGINT_AS_STRING);
            } catch (JsonException) {
                // Not the server's JSON: a proxy's error page, for instance. Reported below.
            }
        }
        if ($status >= 200 && $status < 300 && is_array($decoded)) {
            return $decoded;
        }
        throw ApiException::fromResponse($status, is_array($decoded) ? $decoded : null, $raw, $responseHeaders);
    }

    /** Whether this failure may go away by itself: a 503, or a lost connection (not a TLS or URL error). */
    private static function isRetryable(NotificationServiceException $failure): bool
    {
        if ($failure instanceof ApiException) {
            return $failure->getStatusCode() === 503;
        }
        return in_array($failure->getCode(), self::RETRYABLE_CURL_ERRORS, true);
    }

    /**
     * The wait before retry number `$retry` (from 0): half of `retry_delay × 2^retry` plus a random
     * part up to the other half ("equal jitter"), so that clients cut off together do not come back
     * together, and never less than a server's Retry-After; at most `max_retry_delay`.
     */
    private function backoff(int $retry, NotificationServiceException $failure): float
    {
        $ceiling = min($this->options['max_retry_delay'], $this->options['retry_delay'] * 2 ** $retry);
        $delay = $ceiling / 2 + $ceiling / 2 * (random_int(0, 1_000_000) / 1_000_000);
        if ($failure instanceof ApiException && $failure->getRetryAfter() !== null) {
            $delay = max($delay, (float) $failure->getRetryAfter());
        }
        return min($delay, $this->options['max_retry_delay']);
    }

    /** The path of a user's inbox routes. */
    private static function inbox(string|int $userId): string
    {
        return '/api/v1/notifications/' . self::segment((string) $userId, 'user id');
    }

    /** One percent-encoded path segment; an empty one would address another route. */
    private static function segment(string $value, string $what): string
    {
        if ($value === '') {
            throw new InvalidArgumentException("the {$what} must not be empty");
        }
        return rawurlencode($value);
    }

    /**
     * A value for a request header. The server checks its own rules (an idempotency key is 1 to 255
     * visible ASCII characters); this only keeps a line break from ending the header early.
     */
    private static function headerValue(?string $value, string $what): ?string
    {
        if ($value !== null && preg_match('/[\x00-\x1f\x7f]/', $value) === 1) {
            throw new InvalidArgumentException("the {$what} must not contain control characters");
        }
        return $value;
    }

    /** The JSON of a request body; an empty `data` array goes as `[]`, which the server takes as `{}`. */
    private static function encode(array $body): string
    {
        try {
            return json_encode($body, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION);
        } catch (JsonException $e) {
            throw new InvalidArgumentException('the notification cannot be encoded as JSON: ' . $e->getMessage(), 0, $e);
        }
    }

    /** A random idempotency key (a UUID version 4). */
    private static function randomKey(): string
    {
        $bytes = random_bytes(16);
        $bytes[6] = chr(ord($bytes[6]) & 0x0f | 0x40);
        $bytes[8] = chr(ord($bytes[8]) & 0x3f | 0x80);
        return vsprintf('%s%s-%s-%s-%s-%s%s%s', str_split(bin2hex($bytes), 4));
    }

    /**
     * The options merged with the defaults, each checked.
     *
     * @throws InvalidArgumentException
     */
    private static function validateOptions(array $options): array
    {
        $unknown = array_diff(array_keys($options), array_keys(self::DEFAULTS));
        if ($unknown !== []) {
            throw new InvalidArgumentException('unknown option(s): ' . implode(', ', $unknown)
                . '; known: ' . implode(', ', array_keys(self::DEFAULTS)));
        }
        $options += self::DEFAULTS;
        foreach (['connect_timeout', 'timeout', 'retry_delay', 'max_retry_delay'] as $seconds) {
            if (!is_int($options[$seconds]) && !is_float($options[$seconds]) || $options[$seconds] < 0) {
                throw new InvalidArgumentException("the option {$seconds} must be a number of seconds, 0 or more");
            }
            $options[$seconds] = (float) $options[$seconds];
        }
        if ($options['timeout'] <= 0 || $options['connect_timeout'] <= 0) {
            throw new InvalidArgumentException('the options timeout and connect_timeout must be more than 0');
        }
        if (!is_int($options['retries']) || $options['retries'] < 0) {
            throw new InvalidArgumentException('the option retries must be an integer, 0 or more');
        }
        if (!in_array($options['idempotency'], [null, 'auto'], true)) {
            throw new InvalidArgumentException("the option idempotency must be null or 'auto'");
        }
        if ($options['on_retry'] !== null && !is_callable($options['on_retry'])) {
            throw new InvalidArgumentException('the option on_retry must be callable');
        }
        if (!is_string($options['user_agent'])) {
            throw new InvalidArgumentException('the option user_agent must be a string');
        }
        return $options;
    }
}
