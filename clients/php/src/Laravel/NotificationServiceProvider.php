<?php

declare(strict_types=1);

namespace NotificationService\Laravel;

use Illuminate\Contracts\Foundation\Application;
use Illuminate\Notifications\ChannelManager;
use Illuminate\Support\ServiceProvider;
use InvalidArgumentException;
use NotificationService\Client;

/**
 * Registers the {@see Client} as a singleton built from `config('notifications')`, the
 * `notification-service` notification channel, and the config file for `vendor:publish`.
 * Laravel's package discovery finds it through composer.json's `extra.laravel`.
 */
final class NotificationServiceProvider extends ServiceProvider
{
    /** The package's config file, merged under the `notifications` key and published as `config/notifications.php`. */
    public const CONFIG_FILE = __DIR__ . '/../../config/notifications.php';

    /** The `vendor:publish --tag` of the config file. */
    public const PUBLISH_TAG = 'notification-service-config';

    /** Binds the client, its alias and the channel; nothing is built until first used. */
    public function register(): void
    {
        $this->mergeConfigFrom(self::CONFIG_FILE, 'notifications');

        $this->app->singleton(Client::class, static function ($app): Client {
            return self::clientFromConfig((array) $app['config']->get('notifications', []));
        });
        $this->app->alias(Client::class, 'notification-service');

        $this->callAfterResolving(ChannelManager::class, static function (ChannelManager $channels): void {
            $channels->extend(NotificationServiceChannel::NAME, static function ($app): NotificationServiceChannel {
                return $app->make(NotificationServiceChannel::class);
            });
        });
    }

    /** Offers the config file to `php artisan vendor:publish`. */
    public function boot(): void
    {
        $target = $this->app instanceof Application
            ? $this->app->configPath('notifications.php')
            : 'config/notifications.php';
        $this->publishes([self::CONFIG_FILE => $target], self::PUBLISH_TAG);
    }

    /**
     * The client for the `notifications` config array (see config/notifications.php).
     *
     * @param array<string, mixed> $config
     *
     * @throws InvalidArgumentException without a URL, or with a bad value
     */
    public static function clientFromConfig(array $config): Client
    {
        $url = $config['url'] ?? null;
        if (!is_string($url) || $url === '') {
            throw new InvalidArgumentException('config notifications.url is not set (NOTIFICATIONS_URL in .env)');
        }
        $apiKey = $config['api_key'] ?? null;
        $options = array_intersect_key($config, array_flip([
            'connect_timeout', 'timeout', 'retries', 'retry_delay', 'max_retry_delay', 'idempotency',
        ]));
        // .env has no null other than the word, and an empty value means "off" as well.
        if (($options['idempotency'] ?? null) === '') {
            $options['idempotency'] = null;
        }
        return new Client($url, is_string($apiKey) && $apiKey !== '' ? $apiKey : null, $options);
    }
}
