<?php

declare(strict_types=1);

namespace NotificationService\Tests;

use RuntimeException;

/**
 * The scripted server of tests/stub/router.php in a `php -S` process of its own: the answers to give,
 * in order, and the requests it got.
 */
final class StubServer
{
    /** How long the built-in server may take to listen. */
    private const START_TIMEOUT_S = 10.0;

    /** Requests served at once, so that a retry is answered while an earlier attempt stalls. */
    private const WORKERS = 4;

    /** The `php -S` process. */
    private $process;

    /** The folder of script.json and requests.jsonl. */
    private string $dir;

    /** The base URL to give the client. */
    public string $url;

    /**
     * @param list<array{status: int, body: mixed, headers?: array<string, string>, sleep?: float}> $answers
     */
    public function __construct(array $answers)
    {
        $this->dir = sys_get_temp_dir() . '/ns-php-stub-' . bin2hex(random_bytes(6));
        mkdir($this->dir);
        file_put_contents("{$this->dir}/script.json", json_encode($answers));
        $port = self::freePort();
        $this->url = "http://127.0.0.1:{$port}";
        $this->process = proc_open(
            [PHP_BINARY, '-S', "127.0.0.1:{$port}", __DIR__ . '/stub/router.php'],
            [0 => ['file', '/dev/null', 'r'], 1 => ['file', "{$this->dir}/server.log", 'a'], 2 => ['file', "{$this->dir}/server.log", 'a']],
            $pipes,
            null,
            ['STUB_DIR' => $this->dir, 'PHP_CLI_SERVER_WORKERS' => (string) self::WORKERS],
        );
        $deadline = microtime(true) + self::START_TIMEOUT_S;
        while (!($socket = @fsockopen('127.0.0.1', $port, $errno, $error, 0.2))) {
            if (microtime(true) > $deadline) {
                $this->stop();
                throw new RuntimeException("php -S did not listen on {$port}: {$error}");
            }
            usleep(20_000);
        }
        fclose($socket);
    }

    /**
     * The requests served so far, oldest first.
     *
     * @return list<array{method: string, uri: string, headers: array<string, string>, body: string}>
     */
    public function requests(): array
    {
        $file = "{$this->dir}/requests.jsonl";
        if (!is_file($file)) {
            return [];
        }
        $lines = array_filter(explode("\n", (string) file_get_contents($file)));
        return array_values(array_map(static fn (string $line) => json_decode($line, true), $lines));
    }

    /** Ends the process and removes the folder. */
    public function stop(): void
    {
        if (is_resource($this->process)) {
            proc_terminate($this->process);
            proc_close($this->process);
        }
        foreach (glob("{$this->dir}/*") ?: [] as $file) {
            unlink($file);
        }
        @rmdir($this->dir);
    }

    /** A test that failed before its tearDown leaves no process behind. */
    public function __destruct()
    {
        $this->stop();
    }

    /** A port nothing listens on right now. */
    public static function freePort(): int
    {
        $server = stream_socket_server('tcp://127.0.0.1:0');
        $name = stream_socket_get_name($server, false);
        fclose($server);
        return (int) substr($name, strrpos($name, ':') + 1);
    }
}
