<?php

declare(strict_types=1);

namespace NotificationService;

use Throwable;

/**
 * What every failure of a {@see Client} call implements, so that one `catch` takes them all: the
 * server's error answers ({@see ApiException}) and requests that got no answer ({@see TransportException}).
 * Bad arguments are the caller's mistake and stay \InvalidArgumentException.
 */
interface NotificationServiceException extends Throwable
{
}
