<?php
// A 2 MB JSON round trip, the shape of an API response: encode, decode, check, 20 times.
// Used by `invoke bench php-<version>` (natively, in wasm and in the peer).
$rows = [];
for ($i = 0; $i < 12000; $i++) {
    $rows[] = [
        'id' => $i,
        'name' => "user-$i",
        'email' => "user$i@example.org",
        'score' => $i + 0.25,
        'active' => $i % 3 !== 0,
        'tags' => ['wasm', 'wasi', 'php' . ($i % 10)],
        'note' => "line one\nline \"two\" é",
    ];
}
$bytes = 0;
for ($round = 0; $round < 20; $round++) {
    $text = json_encode(['rows' => $rows, 'round' => $round]);
    $back = json_decode($text, true);
    if ($back['rows'] !== $rows || $back['round'] !== $round) {
        fwrite(STDERR, "round trip $round changed the data\n");
        exit(1);
    }
    $bytes = strlen($text);
}
printf("%d bytes, 20 round trips\n", $bytes);
