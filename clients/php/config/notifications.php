<?php

/*
 * notification-service, for the Laravel package (NotificationService\Laravel\NotificationServiceProvider).
 * Publish it with `php artisan vendor:publish --tag=notification-service-config`; every value comes
 * from .env.
 */
return [
    // The server's base URL (the compose file's service name and port by default).
    'url' => env('NOTIFICATIONS_URL', 'http://notification-service:8080'),

    // One of the server's API_KEY keys; null for a server without keys.
    'api_key' => env('NOTIFICATIONS_API_KEY'),

    // Seconds to open the connection, and for a whole attempt.
    'connect_timeout' => (float) env('NOTIFICATIONS_CONNECT_TIMEOUT', 3),
    'timeout' => (float) env('NOTIFICATIONS_TIMEOUT', 10),

    // Retries after a 503 or a lost connection (sends only with an idempotency key), and the first
    // and the longest backoff in seconds (it doubles each time, with jitter).
    'retries' => (int) env('NOTIFICATIONS_RETRIES', 2),
    'retry_delay' => (float) env('NOTIFICATIONS_RETRY_DELAY', 0.2),
    'max_retry_delay' => (float) env('NOTIFICATIONS_MAX_RETRY_DELAY', 5),

    // 'auto': every send, batch and schedule without a key of its own gets a random one, so that it
    // is retried safely; null: only the keys given are sent (and sends without one are not retried).
    'idempotency' => env('NOTIFICATIONS_IDEMPOTENCY', 'auto'),
];
