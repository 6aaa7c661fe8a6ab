// The peer `invoke bench --peer` measures against: WordPress Playground's PHP 7.4 for Node.js
// (@php-wasm/node-7-4, Emscripten), started the way its CLI SAPI runs a script.
//
// Usage: node run.mjs PHP-ARGUMENTS...   (the same arguments as our php.wasm and native php get)
// The current directory is mounted at the same path in PHP's file system and is PHP's working
// directory, so relative script names work; stdout and stderr are streamed; the exit status is PHP's.
import { PHP, loadPHPRuntime } from '@php-wasm/universal';
import { getPHPLoaderModule } from '@php-wasm/node-7-4';

const here = process.cwd();
const runtime = await loadPHPRuntime(await getPHPLoaderModule(), {
	// Emscripten would end the Node.js process at PHP's exit(); throwing lets php.cli() report the code.
	quit(code, error) {
		throw error;
	},
});
const php = new PHP(runtime);
await php.mount(here, (_php, FS, mountPoint) => {
	FS.mkdirTree(mountPoint);
	FS.mount(FS.filesystems.NODEFS, { root: here }, mountPoint);
	return () => FS.unmount(mountPoint);
});
php.chdir(here);

// argv[0] must be "php": php.cli() runs other names as sub-processes.
const response = await php.cli(['php', ...process.argv.slice(2)]);
const copy = async (stream, out) => {
	for await (const chunk of stream) out.write(chunk);
};
await Promise.all([copy(response.stdout, process.stdout), copy(response.stderr, process.stderr)]);
process.exitCode = await response.exitCode;
