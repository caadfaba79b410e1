<?php

declare(strict_types=1);

namespace NotificationService;

use RuntimeException;

/**
 * A request that got no answer from the server: the connection was refused or reset, a name did not
 * resolve, or a timeout ran out. `getCode()` is curl's error number.
 *
 * A POST that failed this way may still have been stored (its answer may be what was lost): send with
 * an idempotency key to retry it safely.
 */
final class TransportException extends RuntimeException implements NotificationServiceException
{
    /** curl's CURLE_OPERATION_TIMEDOUT, for both the connect and the total timeout. */
    private const CURLE_OPERATION_TIMEDOUT = 28;

    /** Whether the connect or the total timeout ran out (rather than the connection failing). */
    public function isTimeout(): bool
    {
        return $this->getCode() === self::CURLE_OPERATION_TIMEDOUT;
    }
}
