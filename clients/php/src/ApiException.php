<?php

declare(strict_types=1);

namespace NotificationService;

use RuntimeException;

/**
 * The server answered with an error status. docs/API.md's error shape,
 * `{"error":{"code":"snake_case_code","message":"human sentence"}}`, gives the code and the message
 * (`getMessage()`); an answer without it (a proxy's error page) has the code `unexpected_response`.
 */
final class ApiException extends RuntimeException implements NotificationServiceException
{
    /** The code of an answer that is not the API's error shape, or a success that is not JSON. */
    public const UNEXPECTED_RESPONSE = 'unexpected_response';

    /** The HTTP status: 400, 401, 404, 422, 503... */
    private int $statusCode;

    /** The API's `error.code`, e.g. `invalid_field`, `not_found`, `idempotency_key_reused`. */
    private string $errorCode;

    /** The decoded JSON body, when the body was JSON, for fields beyond code and message. */
    private ?array $body;

    /** Seconds from the server's `Retry-After` header (on 429 `rate_limited`), if it sent one. */
    private ?int $retryAfter;

    /**
     * @param array<string, mixed>|null $body the decoded JSON body, if it was JSON
     */
    public function __construct(int $statusCode, string $errorCode, string $message, ?array $body = null, ?int $retryAfter = null)
    {
        parent::__construct($message, $statusCode);
        $this->statusCode = $statusCode;
        $this->errorCode = $errorCode;
        $this->body = $body;
        $this->retryAfter = $retryAfter;
    }

    /**
     * The exception for an error answer.
     *
     * @param array<string, mixed>|null $json the body decoded, or null when it is not JSON
     * @param array<string, string> $headers the answer's headers, names in lower case
     *
     * @internal used by {@see Client}
     */
    public static function fromResponse(int $status, ?array $json, string $raw, array $headers): self
    {
        $error = $json['error'] ?? null;
        $retryAfter = isset($headers['retry-after']) && ctype_digit($headers['retry-after'])
            ? (int) $headers['retry-after']
            : null;
        if ($status >= 300 && is_array($error) && is_string($error['code'] ?? null) && is_string($error['message'] ?? null)) {
            return new self($status, $error['code'], $error['message'], $json, $retryAfter);
        }
        $excerpt = substr(trim($raw), 0, 200);
        $message = $status >= 200 && $status < 300
            ? "the server answered {$status} with a body that is not a JSON object: {$excerpt}"
            : "the server answered {$status} without the API's error shape: {$excerpt}";
        return new self($status, self::UNEXPECTED_RESPONSE, $message, $json, $retryAfter);
    }

    /** The HTTP status of the answer. */
    public function getStatusCode(): int
    {
        return $this->statusCode;
    }

    /** The API's `error.code` (docs/API.md, "Errors"), or {@see self::UNEXPECTED_RESPONSE}. */
    public function getErrorCode(): string
    {
        return $this->errorCode;
    }

    /**
     * The decoded JSON body, or null when it was not JSON.
     *
     * @return array<string, mixed>|null
     */
    public function getBody(): ?array
    {
        return $this->body;
    }

    /** The server's `Retry-After` in seconds, if it sent one. */
    public function getRetryAfter(): ?int
    {
        return $this->retryAfter;
    }
}
