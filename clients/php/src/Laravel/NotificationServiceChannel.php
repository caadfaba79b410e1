<?php

declare(strict_types=1);

namespace NotificationService\Laravel;

use Illuminate\Contracts\Support\Arrayable;
use Illuminate\Notifications\Notification;
use LogicException;
use NotificationService\ApiException;
use NotificationService\Client;
use NotificationService\TransportException;

/**
 * Sends a Laravel notification through notification-service: a `Notification` whose `via()` returns
 * `'notification-service'` (or this class) is stored in the user's inbox and delivered live.
 *
 * - The fields (`message`, `title`, `type`, `data`, `channels`...) come from the notification's
 *   `toNotificationService($notifiable)`, or else its `toArray($notifiable)`.
 * - The user is the fields' own `user_id`, else the notifiable's `routeNotificationForNotificationService()`
 *   (or an on-demand `Notification::route('notification-service', $id)`), else its key (`getKey()`, a
 *   model's id). A notifiable without one, whose fields name no channel and no broadcast, is skipped,
 *   as Laravel's mail channel skips one without an address.
 * - Every send carries an idempotency key made of the notification's id (which Laravel gives each
 *   notifiable, and keeps when it queues one) and the user: a queued notification whose job is retried
 *   after a timeout is stored once.
 */
final class NotificationServiceChannel
{
    /** The name to return from `via()`, and the `route()` name of on-demand notifications. */
    public const NAME = 'notification-service';

    /** The client the provider built from config. */
    private Client $client;

    /** Made by the container, with the provider's configured client. */
    public function __construct(Client $client)
    {
        $this->client = $client;
    }

    /**
     * Sends the notification to its user.
     *
     * @param mixed $notifiable a model using `Notifiable`, any class using `RoutesNotifications`, or an
     *                          `AnonymousNotifiable`
     *
     * @return array{id: string, timestamp: string}|null the server's answer (Laravel passes it on in the
     *                                                  `NotificationSent` event), or null when skipped
     *
     * @throws ApiException when the server refuses the notification (a missing `message` is `invalid_field`)
     * @throws TransportException
     * @throws LogicException when the notification has neither `toNotificationService()` nor `toArray()`
     */
    public function send($notifiable, Notification $notification): ?array
    {
        $fields = $this->fields($notifiable, $notification);
        if (!array_key_exists('user_id', $fields)) {
            $userId = $this->userId($notifiable, $notification);
            if ($userId !== null) {
                $fields['user_id'] = $userId;
            } elseif (empty($fields['channels']) && empty($fields['broadcast'])) {
                return null;
            }
        }
        return $this->client->send($fields, $this->idempotencyKey($notification, $fields['user_id'] ?? null));
    }

    /**
     * The notification's fields for the API.
     *
     * @return array<string, mixed>
     */
    private function fields($notifiable, Notification $notification): array
    {
        if (method_exists($notification, 'toNotificationService')) {
            $fields = $notification->toNotificationService($notifiable);
        } elseif (method_exists($notification, 'toArray')) {
            $fields = $notification->toArray($notifiable);
        } else {
            throw new LogicException(get_class($notification) . ' has no toNotificationService($notifiable) method (nor toArray)');
        }
        if ($fields instanceof Arrayable) {
            $fields = $fields->toArray();
        }
        if (!is_array($fields)) {
            throw new LogicException(get_class($notification) . '::toNotificationService() must return an array of the notification\'s fields');
        }
        return $fields;
    }

    /** Whom the notification is for, as the notifiable routes it: its route for this channel, or its key. */
    private function userId($notifiable, Notification $notification): string|int|null
    {
        $route = null;
        if (is_object($notifiable) && method_exists($notifiable, 'routeNotificationFor')) {
            $route = $notifiable->routeNotificationFor(self::NAME, $notification);
        }
        if ($route === null && is_object($notifiable) && method_exists($notifiable, 'getKey')) {
            $route = $notifiable->getKey();
        }
        return is_string($route) || is_int($route) ? $route : null;
    }

    /**
     * A key that is the same each time this notification is sent to this user, and different for every
     * other notification or user; null for a notification Laravel gave no id (sent outside its dispatcher).
     */
    private function idempotencyKey(Notification $notification, string|int|null $userId): ?string
    {
        if (!is_string($notification->id) || $notification->id === '') {
            return null;
        }
        return 'laravel-' . hash('sha256', $notification->id . "\n" . (string) $userId);
    }
}
