<?php

declare(strict_types=1);

/*
 * A scripted HTTP server for the retry and timeout tests, run as `php -S 127.0.0.1:PORT router.php`
 * with STUB_DIR set: each request is logged to STUB_DIR/requests.jsonl and answered with the next entry
 * of STUB_DIR/script.json, `{"status", "body", "headers", "sleep"}` (the last entry repeats). The real
 * server cannot be made to answer 503 on cue; everything else is tested against it.
 */

$dir = getenv('STUB_DIR');
$headers = function_exists('getallheaders') ? getallheaders() : [];
file_put_contents("{$dir}/requests.jsonl", json_encode([
    'method' => $_SERVER['REQUEST_METHOD'],
    'uri' => $_SERVER['REQUEST_URI'],
    'headers' => array_change_key_case($headers, CASE_LOWER),
    'body' => file_get_contents('php://input'),
]) . "\n", FILE_APPEND | LOCK_EX);

// Several workers serve at once (PHP_CLI_SERVER_WORKERS), so that a retry is answered while an
// earlier attempt still stalls: the count of requests served is taken under a lock.
$script = json_decode((string) file_get_contents("{$dir}/script.json"), true);
$counter = fopen("{$dir}/served", 'c+');
flock($counter, LOCK_EX);
$served = (int) stream_get_contents($counter);
ftruncate($counter, 0);
rewind($counter);
fwrite($counter, (string) ($served + 1));
flock($counter, LOCK_UN);
fclose($counter);
$answer = $script[min($served, count($script) - 1)];

if (!empty($answer['sleep'])) {
    usleep((int) ($answer['sleep'] * 1_000_000));
}
http_response_code($answer['status']);
foreach ($answer['headers'] ?? ['Content-Type' => 'application/json'] as $name => $value) {
    header("{$name}: {$value}");
}
echo is_string($answer['body']) ? $answer['body'] : json_encode($answer['body']);
