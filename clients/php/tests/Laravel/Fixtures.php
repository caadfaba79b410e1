<?php

declare(strict_types=1);

namespace NotificationService\Tests\Laravel;

use Illuminate\Bus\Queueable;
use Illuminate\Contracts\Queue\ShouldQueue;
use Illuminate\Database\Eloquent\Model;
use Illuminate\Notifications\Notifiable;
use Illuminate\Notifications\Notification;
use NotificationService\Laravel\NotificationServiceChannel;

/*
 * An application's classes, as a Laravel app writes them: a User model, a notifiable that routes
 * itself, and notifications for the package's channel.
 */

/** The app's user model (`App\Models\User`): notified at its key, the integer id. */
final class User extends Model
{
    use Notifiable;

    protected $guarded = [];
}

/** A notifiable that names its own user id for this service (a tenant-prefixed one). */
final class TenantMember
{
    use Notifiable;

    /** The member's id within the tenant. */
    public string $memberId;

    public function __construct(string $memberId)
    {
        $this->memberId = $memberId;
    }

    /** The user id of this member in notification-service. */
    public function routeNotificationForNotificationService(Notification $notification): string
    {
        return "tenant-7:{$this->memberId}";
    }
}

/** The seeds' "new task" notification, with the package's `toNotificationService()`. */
final class TaskAssigned extends Notification
{
    /** The assigned task's id. */
    public int $taskId;

    /** The task's title, the notification's message. */
    public string $taskTitle;

    public function __construct(int $taskId, string $taskTitle)
    {
        $this->taskId = $taskId;
        $this->taskTitle = $taskTitle;
    }

    /** @return list<string> */
    public function via($notifiable): array
    {
        return ['notification-service'];
    }

    /** @return array<string, mixed> */
    public function toNotificationService($notifiable): array
    {
        return [
            'type' => 'tarea',
            'title' => 'Nueva Tarea Asignada',
            'message' => $this->taskTitle,
            'channels' => ['tareas'],
            'data' => ['task_id' => $this->taskId],
        ];
    }
}

/** A queued notification: Laravel sends it from a job on the queue. */
final class ReportReady extends Notification implements ShouldQueue
{
    use Queueable;

    /** @return list<string> */
    public function via($notifiable): array
    {
        return ['notification-service'];
    }

    /** @return array<string, mixed> */
    public function toNotificationService($notifiable): array
    {
        return ['type' => 'report', 'message' => 'Your report is ready'];
    }
}

/** A notification with only `toArray()`, routed by the channel's class name. */
final class InvoicePaid extends Notification
{
    /** @return list<string> */
    public function via($notifiable): array
    {
        return [NotificationServiceChannel::class];
    }

    /** @return array<string, mixed> */
    public function toArray($notifiable): array
    {
        return ['type' => 'invoice', 'message' => 'Invoice paid', 'data' => []];
    }
}

/** A notification the server refuses (no message). */
final class Malformed extends Notification
{
    /** @return list<string> */
    public function via($notifiable): array
    {
        return ['notification-service'];
    }

    /** @return array<string, mixed> */
    public function toNotificationService($notifiable): array
    {
        return ['title' => 'no message'];
    }
}
