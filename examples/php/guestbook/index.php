<?php
// A guestbook: a form, its entries in SQLite, a session (a token against cross-site posts and a
// message for the next page), and a redirect after each POST, so a reload never posts twice.
// The database lives in the server's state directory (WASMFORGE_STATE; /state in wasm).
declare(strict_types=1);

$state = $_SERVER['WASMFORGE_STATE'] ?? sys_get_temp_dir();
$db = new PDO('sqlite:' . $state . '/guestbook.sqlite', null, null,
              [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
$db->exec('CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, name TEXT NOT NULL,
           message TEXT NOT NULL, created TEXT NOT NULL)');

session_start();
if (empty($_SESSION['token'])) {
    $_SESSION['token'] = bin2hex(random_bytes(16));
}

if ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $name = trim((string)($_POST['name'] ?? ''));
    $message = trim((string)($_POST['message'] ?? ''));
    if (!hash_equals($_SESSION['token'], (string)($_POST['token'] ?? ''))) {
        http_response_code(403);
        exit("The form has expired: reload the page and try again.\n");
    }
    if ($name === '' || $message === '' || mb_strlen($name) > 80 || mb_strlen($message) > 2000) {
        $_SESSION['flash'] = 'A name (up to 80 characters) and a message (up to 2000) are needed.';
    } else {
        $insert = $db->prepare('INSERT INTO entries (name, message, created) VALUES (?, ?, ?)');
        $insert->execute([$name, $message, gmdate('Y-m-d H:i:s')]);
        $_SESSION['flash'] = 'Thank you, ' . $name . '!';
    }
    header('Location: ' . strtok($_SERVER['REQUEST_URI'], '?'), true, 303);
    exit;
}

$flash = $_SESSION['flash'] ?? null;
unset($_SESSION['flash']);
$entries = $db->query('SELECT name, message, created FROM entries ORDER BY id DESC LIMIT 50')->fetchAll();
$count = (int)$db->query('SELECT COUNT(*) FROM entries')->fetchColumn();
$h = static fn(string $s): string => htmlspecialchars($s, ENT_QUOTES, 'UTF-8');
?>
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Guestbook</title><link rel="stylesheet" href="style.css"></head>
<body>
<h1>Guestbook</h1>
<p id="count"><?= $count ?> <?= $count === 1 ? 'entry' : 'entries' ?>, served by PHP <?= PHP_VERSION ?> on <?= $h(PHP_OS) ?></p>
<?php if ($flash !== null): ?><p id="flash"><?= $h($flash) ?></p><?php endif ?>
<form method="post">
  <input type="hidden" name="token" value="<?= $h($_SESSION['token']) ?>">
  <label>Name <input name="name" maxlength="80" required></label>
  <label>Message <textarea name="message" maxlength="2000" required></textarea></label>
  <button type="submit">Sign</button>
</form>
<ol id="entries">
<?php foreach ($entries as $e): ?>
  <li><b class="name"><?= $h($e['name']) ?></b> <span class="message"><?= nl2br($h($e['message'])) ?></span>
      <time><?= $h($e['created']) ?></time></li>
<?php endforeach ?>
</ol>
</body>
</html>
