<?php

declare(strict_types=1);

/*
 * Loads the client (Composer's autoloader when `composer install` ran, else autoload.php), the tests'
 * own classes, and Laravel: Composer's, or the system's (Debian's php-laravel-framework installs an
 * autoloader at /usr/share/php/Illuminate/autoload.php; LARAVEL_AUTOLOAD names another).
 */

if (is_file(__DIR__ . '/../vendor/autoload.php')) {
    require __DIR__ . '/../vendor/autoload.php';
} else {
    require __DIR__ . '/../autoload.php';
    spl_autoload_register(static function (string $class): void {
        $prefix = 'NotificationService\\Tests\\';
        if (strncmp($class, $prefix, strlen($prefix)) === 0) {
            $file = __DIR__ . '/' . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
            if (is_file($file)) {
                require $file;
            }
        }
    });
}

if (!class_exists(\Illuminate\Foundation\Application::class)) {
    $laravel = getenv('LARAVEL_AUTOLOAD') ?: '/usr/share/php/Illuminate/autoload.php';
    if (is_file($laravel)) {
        require $laravel;
    }
}
