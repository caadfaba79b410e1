<?php

declare(strict_types=1);

namespace NotificationService\Laravel\Facades;

use Illuminate\Support\Facades\Facade;
use NotificationService\Client;

/**
 * The container's {@see Client}, statically: `NotificationService::send([...])`.
 *
 * @method static array send(array $notification, ?string $idempotencyKey = null)
 * @method static array batch(array $notifications, ?string $idempotencyKey = null)
 * @method static array schedule(array $notification, ?string $idempotencyKey = null)
 * @method static array getScheduled(string $id)
 * @method static void cancelScheduled(string $id)
 * @method static array history(string|int $userId, array $query = [])
 * @method static array markRead(string|int $userId, string $id)
 * @method static int markAllRead(string|int $userId)
 * @method static void delete(string|int $userId, string $id)
 *
 * @see Client
 */
final class NotificationService extends Facade
{
    /** The container binding the facade stands for. */
    protected static function getFacadeAccessor(): string
    {
        return Client::class;
    }
}
