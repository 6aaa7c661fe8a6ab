<?php
// The seed demo: what can a PHP script see of the machine it runs on?
// Natively it sees the host; as WebAssembly in wasmtime it sees only what it was granted.

echo "PHP ", phpversion(), " on ", php_uname(), "\n";

$variables = array_keys(getenv());
sort($variables);
echo count($variables), " environment variables", $variables ? ": " . implode(", ", $variables) : "", "\n";

date_default_timezone_set('UTC');
echo "Hello! It is ", date('l, j F Y, H:i:s T'), ".\n";

echo "Entries of /:\n";
$entries = scandir('/');
if ($entries === false) {
    echo "  (cannot list /: ", error_get_last()['message'] ?? 'unknown error', ")\n";
} else {
    foreach ($entries as $entry) {
        if ($entry !== '.' && $entry !== '..') {
            echo "  ", $entry, "\n";
        }
    }
}
