/*
 * wasmforge-run: start a WASI command module from its precompiled form, with the wasmtime library
 * that the Python package ships (so the code was compiled by the same wasmtime version), without
 * starting Python. Built by `invoke launcher`.
 *
 *   wasmforge-run [--dir GUEST:HOST[:ro]]... [--env K=V]... [--inherit-env] [--timeout SECONDS] MODULE.wasm [ARGS...]
 *
 * Like wasmforge's runner: the module sees no environment variables and no directories unless
 * given; the exit status is the program's (proc_exit is our own, so statuses >= 126 survive), 134 on
 * a trap or timeout. WASMFORGE_RUN_DEBUG=1 says which form was loaded. The few declarations of
 * wasmtime's C API (and OpenSSL's SHA256) we use are written out here.
 *
 * MODULE.cwasm is native code that wasmtime runs without checks of its own, so it is used only when
 * it is exactly what wasmforge wrote: its sha256 is the one in MODULE.cwasm.json, that key names the
 * sha256 of MODULE.wasm, and wasmtime loads the very file checked (our open descriptor, or the bytes
 * hashed); else MODULE.wasm is compiled. A module inside an artifact store entry must also match the
 * entry's manifest.json. Digests are remembered per file state in the same stamps as wasmforge's
 * Python side (wasmforge/verified.py: <cache>/verified/<dev>-<inode>, "size mtime_ns ctime_ns sha256"),
 * so an unchanged module is not hashed at every start.
 * Closed standard descriptors are given /dev/null first, so no file we open becomes the program's
 * stdin. At --timeout the process ends, as a shell's timeout would end it.
 */
#define _GNU_SOURCE  /* memrchr */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

extern unsigned char *SHA256(const unsigned char *data, size_t size, unsigned char *digest);

typedef struct wasm_config_t wasm_config_t;
typedef struct wasm_engine_t wasm_engine_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasm_valtype_t wasm_valtype_t;
typedef struct wasm_functype_t wasm_functype_t;
typedef struct wasmtime_error_t wasmtime_error_t;
typedef struct wasmtime_module_t wasmtime_module_t;
typedef struct wasmtime_store_t wasmtime_store_t;
typedef struct wasmtime_context_t wasmtime_context_t;
typedef struct wasmtime_linker_t wasmtime_linker_t;
typedef struct wasmtime_caller_t wasmtime_caller_t;
typedef struct wasi_config_t wasi_config_t;
typedef struct { size_t size; char *data; } wasm_byte_vec_t;
typedef struct { size_t size; wasm_valtype_t **data; } wasm_valtype_vec_t;
typedef struct { uint64_t store_id; void *private_; } wasmtime_func_t;
/* wasmtime_val_t: a kind byte, then a 24-byte union aligned to 8; only args[0].i32 is read here. */
typedef struct { uint8_t kind; uint8_t pad_[7]; int32_t i32; uint8_t rest_[20]; } wasmtime_val_t;
typedef wasm_trap_t *(*wasmtime_func_callback_t)(void *, wasmtime_caller_t *, const wasmtime_val_t *, size_t,
                                                 wasmtime_val_t *, size_t);

extern wasm_config_t *wasm_config_new(void);
extern void wasmtime_config_wasm_exceptions_set(wasm_config_t *, bool);
extern void wasmtime_config_max_wasm_stack_set(wasm_config_t *, size_t);
extern void wasmtime_config_async_stack_size_set(wasm_config_t *, uint64_t);
extern wasm_engine_t *wasm_engine_new_with_config(wasm_config_t *);
extern wasmtime_error_t *wasmtime_module_deserialize(wasm_engine_t *, const uint8_t *, size_t, wasmtime_module_t **);
extern wasmtime_error_t *wasmtime_module_deserialize_file(wasm_engine_t *, const char *, wasmtime_module_t **);
extern wasmtime_error_t *wasmtime_module_new(wasm_engine_t *, const uint8_t *, size_t, wasmtime_module_t **);
extern wasmtime_store_t *wasmtime_store_new(wasm_engine_t *, void *, void (*)(void *));
extern wasmtime_context_t *wasmtime_store_context(wasmtime_store_t *);
extern wasmtime_error_t *wasmtime_context_set_wasi(wasmtime_context_t *, wasi_config_t *);
extern wasi_config_t *wasi_config_new(void);
extern bool wasi_config_set_argv(wasi_config_t *, size_t, const char **);
extern bool wasi_config_set_env(wasi_config_t *, size_t, const char **, const char **);
extern void wasi_config_inherit_env(wasi_config_t *);
extern void wasi_config_inherit_stdin(wasi_config_t *);
extern void wasi_config_inherit_stdout(wasi_config_t *);
extern void wasi_config_inherit_stderr(wasi_config_t *);
extern bool wasi_config_preopen_dir(wasi_config_t *, const char *, const char *, bool);
extern wasmtime_linker_t *wasmtime_linker_new(wasm_engine_t *);
extern void wasmtime_linker_allow_shadowing(wasmtime_linker_t *, bool);
extern wasmtime_error_t *wasmtime_linker_define_wasi(wasmtime_linker_t *);
extern wasmtime_error_t *wasmtime_linker_define_func(wasmtime_linker_t *, const char *, size_t, const char *, size_t,
                                                     const wasm_functype_t *, wasmtime_func_callback_t, void *,
                                                     void (*)(void *));
extern wasmtime_error_t *wasmtime_linker_module(wasmtime_linker_t *, wasmtime_context_t *, const char *, size_t,
                                                const wasmtime_module_t *);
extern wasmtime_error_t *wasmtime_linker_get_default(wasmtime_linker_t *, wasmtime_context_t *, const char *, size_t,
                                                     wasmtime_func_t *);
extern wasmtime_error_t *wasmtime_func_call(wasmtime_context_t *, const wasmtime_func_t *, const wasmtime_val_t *,
                                            size_t, wasmtime_val_t *, size_t, wasm_trap_t **);
extern void wasmtime_error_message(const wasmtime_error_t *, wasm_byte_vec_t *);
extern void wasm_trap_message(const wasm_trap_t *, wasm_byte_vec_t *);
extern wasm_trap_t *wasmtime_trap_new(const char *, size_t);
extern wasm_valtype_t *wasm_valtype_new(uint8_t);
extern void wasm_valtype_vec_new(wasm_valtype_vec_t *, size_t, wasm_valtype_t *const *);
extern void wasm_valtype_vec_new_empty(wasm_valtype_vec_t *);
extern wasm_functype_t *wasm_functype_new(wasm_valtype_vec_t *, wasm_valtype_vec_t *);

#define WASM_I32 0
#define MAX_ITEMS 256

static int exit_status = -1;
static double timeout_seconds = 0;

/* At the timeout the process ends, whether the module runs or waits in a host call (reading stdin).
 * The engine has no epoch interruption: its check on every loop back-edge cost 35% of PHP's
 * SWITCH VM (docs/benchmarks.md), and this process has nothing to go on with after a timeout. */
static void *watchdog(void *unused) {
    (void)unused;
    struct timespec wait = {(time_t)timeout_seconds, (long)((timeout_seconds - (time_t)timeout_seconds) * 1e9)};
    nanosleep(&wait, NULL);
    fflush(stdout);
    fprintf(stderr, "wasmforge-run: killed by the timeout after %g s\n", timeout_seconds);
    _exit(134);
    return NULL;
}

/* Whole file into memory (the bytes we hash are the bytes we use); NULL if it cannot be read. */
static uint8_t *read_fd(int fd, size_t *size) {
    struct stat st;
    if (fstat(fd, &st) != 0) return NULL;
    size_t capacity = st.st_size > 0 ? (size_t)st.st_size + 1 : 1 << 16, used = 0;
    uint8_t *data = malloc(capacity);
    if (!data) return NULL;
    for (;;) {
        if (used == capacity) {
            uint8_t *grown = realloc(data, capacity *= 2);
            if (!grown) { free(data); return NULL; }
            data = grown;
        }
        ssize_t n = pread(fd, data + used, capacity - used, (off_t)used);
        if (n < 0) { if (errno == EINTR) continue; free(data); return NULL; }
        if (n == 0) break;
        used += (size_t)n;
    }
    *size = used;
    return data;
}

static uint8_t *read_file(const char *path, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    uint8_t *data = read_fd(fd, size);
    close(fd);
    return data;
}

static void sha256_hex(const uint8_t *data, size_t size, char out[65]) {
    unsigned char digest[32];
    SHA256(data, size, digest);
    for (int k = 0; k < 32; k++) snprintf(out + 2 * k, 3, "%02x", digest[k]);
}

/* <cache>/verified, as wasmforge's default_cache_dir() finds <cache>; NULL when it is not private to us. */
static const char *stamps_dir(void) {
    static char dir[4096];
    const char *cache = getenv("WASMFORGE_CACHE"), *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    int n;
    if (cache && *cache) n = snprintf(dir, sizeof dir, "%s/verified", cache);
    else if (xdg && *xdg) n = snprintf(dir, sizeof dir, "%s/wasmforge/verified", xdg);
    else if (home && *home) n = snprintf(dir, sizeof dir, "%s/.cache/wasmforge/verified", home);
    else return NULL;
    if (n < 0 || (size_t)n >= sizeof dir) return NULL;
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (mkdir(dir, 0700) != 0 || stat(dir, &st) != 0) return NULL;
    }
    if (!S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 077)) return NULL;
    return dir;
}

/* The sha256 of an open file: from its stamp while the file's state is unchanged, else hashed (and
 * stamped). When it had to be read, *bytes receives the content (the caller frees it). */
static bool fd_sha256(int fd, char out[65], uint8_t **bytes, size_t *size) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return false;
    char state[128], stamp[4200], text[256];
    snprintf(state, sizeof state, "%lld %lld %lld", (long long)st.st_size,
             (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
             (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec);
    const char *dir = stamps_dir();
    if (dir) {
        snprintf(stamp, sizeof stamp, "%s/%llu-%llu", dir, (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
        FILE *f = fopen(stamp, "r");
        if (f) {
            size_t n = fread(text, 1, sizeof text - 1, f);
            fclose(f);
            text[n] = '\0';
            size_t len = strlen(state);
            if (n == len + 66 && strncmp(text, state, len) == 0 && text[len] == ' ' && text[len + 65] == '\n') {
                bool hex = true;
                for (int k = 0; k < 64; k++) {
                    char c = text[len + 1 + k];
                    hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
                }
                if (hex) {
                    memcpy(out, text + len + 1, 64);
                    out[64] = '\0';
                    return true;
                }
            }
        }
    }
    uint8_t *data = read_fd(fd, size);
    if (!data) return false;
    sha256_hex(data, *size, out);
    *bytes = data;
    if (dir) {
        char tmp[4300];
        snprintf(tmp, sizeof tmp, "%s.tmp-%d", stamp, (int)getpid());
        FILE *f = fopen(tmp, "w");
        if (f) {
            bool ok = fprintf(f, "%s %s\n", state, out) > 0;
            ok = (fclose(f) == 0) && ok;
            if (!ok || rename(tmp, stamp) != 0) unlink(tmp);
        }
    }
    return true;
}

/* The 64 hex digits after `"<field>": "` following `after` in a JSON text we wrote; false if absent. */
static bool json_hex(const char *text, const char *after, const char *field, char out[65]) {
    const char *at = after ? strstr(text, after) : text;
    if (!at) return false;
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\": \"", field);
    const char *value = strstr(at, pattern);
    if (!value) return false;
    value += strlen(pattern);
    for (int k = 0; k < 64; k++) {
        char c = value[k];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
        out[k] = c;
    }
    out[64] = '\0';
    return value[64] == '"';
}

/* A file's bytes with a NUL after them (`size`: their number). */
static char *text_file(const char *path, size_t *size) {
    uint8_t *data = read_file(path, size);
    if (!data) return NULL;
    char *text = realloc(data, *size + 1);
    if (!text) { free(data); return NULL; }
    text[*size] = '\0';
    return text;
}

/* The resolved `path`, with *entry_len set to the length of its prefix that is an artifact store entry
 * (a directory named by a 64-hex key inside one named by its first two characters), or 0. */
static char *resolve_in_entry(const char *path, size_t *entry_len) {
    *entry_len = 0;
    char *real = realpath(path, NULL);
    if (!real) return NULL;
    for (char *end = strrchr(real, '/'); end && end > real; end = memrchr(real, '/', (size_t)(end - real))) {
        char *name = memrchr(real, '/', (size_t)(end - real));
        if (!name) break;
        name++;
        bool key = end - name == 64;
        for (int k = 0; key && k < 64; k++) key = (name[k] >= '0' && name[k] <= '9') || (name[k] >= 'a' && name[k] <= 'f');
        if (key && name - real >= 4 && name[-1] == '/' && name[-4] == '/' && strncmp(name - 3, name, 2) == 0) {
            *entry_len = (size_t)(end - real);
            break;
        }
    }
    return real;
}

/* Whether the manifest's outputs (from its top-level `"outputs": {` on) list `rel` with this sha256. */
static bool listed_with(const char *outputs, const char *rel, const char *sha) {
    char label[4400], found[65];
    snprintf(label, sizeof label, "\n    \"%s\": {", rel);
    const char *end = strstr(outputs, "\n  }");
    const char *at = strstr(outputs, label);
    return at && (!end || at < end) && json_hex(at, NULL, "sha256", found) && strcmp(found, sha) == 0;
}

/* Whether the key file's "aot" value is exactly `expected`, followed by the next field. */
static bool aot_matches(const char *key, const char *expected) {
    const char *at = strstr(key, "\"aot\": ");
    if (!at) return false;
    at += strlen("\"aot\": ");
    size_t len = strlen(expected);
    return strncmp(at, expected, len) == 0 && at[len] == ',';
}

static wasm_trap_t *proc_exit(void *env, wasmtime_caller_t *caller, const wasmtime_val_t *args, size_t nargs,
                              wasmtime_val_t *results, size_t nresults) {
    (void)env; (void)caller; (void)nargs; (void)results; (void)nresults;
    exit_status = args[0].i32 & 0xFF;  /* as a POSIX parent sees it */
    return wasmtime_trap_new("proc_exit", 9);
}

static void fail(const char *what, wasmtime_error_t *error, wasm_trap_t *trap) {
    wasm_byte_vec_t message = {0, NULL};
    if (error) wasmtime_error_message(error, &message);
    if (trap) wasm_trap_message(trap, &message);
    fprintf(stderr, "wasmforge-run: %s%s%.*s\n", what, message.size ? ": " : "", (int)message.size,
            message.data ? message.data : "");
    exit(trap ? 134 : 1);
}

/* The engine settings of precompile (runtime.engine_settings, for the uninterruptible engine): the
 * wasm stack of WASM_STACK_BYTES, which wasmtime allows only within its async stack size. */
static wasm_engine_t *new_engine(bool exceptions) {
    wasm_config_t *config = wasm_config_new();
    wasmtime_config_wasm_exceptions_set(config, exceptions);
    wasmtime_config_async_stack_size_set(config, (uint64_t)WASM_STACK_BYTES + (1u << 20));
    wasmtime_config_max_wasm_stack_set(config, WASM_STACK_BYTES);
    return wasm_engine_new_with_config(config);
}

static wasmtime_module_t *load(const char *wasm, wasm_engine_t **engine_out) {
    bool debug = getenv("WASMFORGE_RUN_DEBUG") != NULL;
    size_t n = strlen(wasm);
    char *cwasm = malloc(n + 2), *key_path = malloc(n + 8);
    if (!cwasm || !key_path) exit(1);
    memcpy(cwasm, wasm, n + 1);
    if (n > 5 && strcmp(wasm + n - 5, ".wasm") == 0) strcpy(cwasm + n - 5, ".cwasm");
    snprintf(key_path, n + 8, "%s.json", cwasm);
    int wasm_fd = open(wasm, O_RDONLY | O_CLOEXEC);
    char wasm_sha[65], expected[65];
    uint8_t *wasm_bytes = NULL;
    size_t wasm_size = 0;
    if (wasm_fd < 0 || !fd_sha256(wasm_fd, wasm_sha, &wasm_bytes, &wasm_size)) {
        fprintf(stderr, "wasmforge-run: cannot read %s: %s\n", wasm, strerror(errno));
        exit(1);
    }

    /* In a store entry (STORE/kk/KEY/..., found by the shape of the resolved path, so a deleted
     * manifest.json does not hide it) the module must be one the manifest lists, with its sha256. */
    size_t entry_len = 0;
    char *real = resolve_in_entry(wasm, &entry_len);
    char *entry = NULL, *outputs = NULL, *manifest_text = NULL, rel_cwasm[4096] = "", rel_key[4200] = "";
    if (entry_len) {
        entry = strndup(real, entry_len);
        char manifest[4200];
        size_t manifest_size = 0;
        snprintf(manifest, sizeof manifest, "%s/manifest.json", entry);
        manifest_text = text_file(manifest, &manifest_size);
        outputs = manifest_text ? strstr(manifest_text, "\n  \"outputs\": {") : NULL;  /* the top-level key */
        const char *rel = real + entry_len + 1;
        if (!outputs || !listed_with(outputs, rel, wasm_sha)) {
            fprintf(stderr, "wasmforge-run: %s belongs to a damaged artifact store entry (%s): %s; nothing was run "
                            "(rebuild it with invoke build)\n", wasm, entry,
                    !manifest_text ? "no readable manifest.json" : !outputs ? "manifest.json lists no outputs"
                                   : "the module is not the one its manifest.json lists");
            exit(1);
        }
        snprintf(rel_cwasm, sizeof rel_cwasm, "%.*s.cwasm", (int)strlen(rel) - 5, rel);
        snprintf(rel_key, sizeof rel_key, "%s.json", rel_cwasm);
    }
    free(real);

    wasmtime_module_t *module = NULL;
    size_t key_size = 0;
    char *key = text_file(key_path, &key_size);
    char cwasm_sha[65], key_sha[65];
    int code_fd = -1;
    size_t code_size = 0;
    uint8_t *code = NULL;
    /* The key must be for this wasmtime, engine settings, architecture and CPU (the text precompile
     * writes for them, compiled into this launcher), which also says whether the module uses exceptions. */
    int exceptions = !key ? -1 : aot_matches(key, AOT_WITH_EXCEPTIONS) ? 1 : aot_matches(key, AOT_WITHOUT_EXCEPTIONS) ? 0 : -1;
    if (key && exceptions < 0 && debug) fprintf(stderr, "wasmforge-run: %s was made for another engine or CPU\n", cwasm);
    if (key) sha256_hex((const uint8_t *)key, key_size, key_sha);
    if (key && exceptions >= 0 && json_hex(key, NULL, "wasm_sha256", expected) && strcmp(expected, wasm_sha) == 0 &&
        json_hex(key, NULL, "cwasm_sha256", expected) && (code_fd = open(cwasm, O_RDONLY | O_CLOEXEC)) >= 0 &&
        fd_sha256(code_fd, cwasm_sha, &code, &code_size)) {
        if (entry && (!listed_with(outputs, rel_cwasm, cwasm_sha) || !listed_with(outputs, rel_key, key_sha))) {
            fprintf(stderr, "wasmforge-run: %s belongs to a damaged artifact store entry (%s): its precompiled code "
                            "or key is not what manifest.json lists; nothing was run (rebuild it with invoke build)\n",
                    wasm, entry);
            exit(1);
        }
        if (strcmp(cwasm_sha, expected) == 0) {
            /* wasmtime loads what was checked: the bytes hashed, or (from a stamp) our open descriptor,
             * which a file renamed into place cannot change. */
            char own[64];
            snprintf(own, sizeof own, "/proc/self/fd/%d", code_fd);
            wasm_engine_t *engine = new_engine(exceptions);
            wasmtime_error_t *error = code ? wasmtime_module_deserialize(engine, code, code_size, &module)
                                           : wasmtime_module_deserialize_file(engine, own, &module);
            if (!error) {
                if (debug) fprintf(stderr, "wasmforge-run: precompiled %s\n", cwasm);
                *engine_out = engine;
                free(code);
                free(key);
                free(wasm_bytes);
                free(manifest_text);
                free(entry);
                close(code_fd);
                close(wasm_fd);
                return module;
            }
        } else if (debug) {
            fprintf(stderr, "wasmforge-run: %s does not match its key's sha256; not used\n", cwasm);
        }
    }
    if (code_fd >= 0) close(code_fd);
    free(code);
    free(key);
    free(manifest_text);
    free(entry);
    if (!wasm_bytes) {
        wasm_bytes = read_fd(wasm_fd, &wasm_size);
        char again[65];
        if (!wasm_bytes) { fprintf(stderr, "wasmforge-run: cannot read %s\n", wasm); exit(1); }
        sha256_hex(wasm_bytes, wasm_size, again);
        if (strcmp(again, wasm_sha) != 0) { fprintf(stderr, "wasmforge-run: %s changed while starting\n", wasm); exit(1); }
    }
    close(wasm_fd);
    *engine_out = new_engine(true);
    if (debug) fprintf(stderr, "wasmforge-run: compiling %s (no usable %s)\n", wasm, cwasm);
    wasmtime_error_t *error = wasmtime_module_new(*engine_out, wasm_bytes, wasm_size, &module);
    if (error) fail("cannot compile the module", error, NULL);
    free(wasm_bytes);
    return module;
}

int main(int argc, char **argv) {
    /* A closed stdin/stdout/stderr gets /dev/null before any file is opened. */
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
            int null = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
            if (null != fd) { if (null < 0 || dup2(null, fd) < 0) return 1; close(null); }
        }
    }
    const char *env_names[MAX_ITEMS], *env_values[MAX_ITEMS];
    char *dirs[MAX_ITEMS];
    size_t n_env = 0, n_dirs = 0;
    bool inherit_env = false;
    int i = 1;
    for (; i < argc && argv[i][0] == '-' && argv[i][1] == '-'; i += 2) {
        if (strcmp(argv[i], "--inherit-env") == 0) { inherit_env = true; i--; continue; }
        if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) {
            char *end = NULL;
            errno = 0;
            timeout_seconds = strtod(argv[i + 1], &end);
            if (errno || end == argv[i + 1] || *end || !(timeout_seconds > 0 && timeout_seconds < 1e9)) {
                fprintf(stderr, "wasmforge-run: --timeout %s: expected a positive number of seconds\n", argv[i + 1]);
                return 2;
            }
            continue;
        }
        if (i + 1 >= argc) { fprintf(stderr, "wasmforge-run: %s needs a value\n", argv[i]); return 2; }
        char *value = argv[i + 1];
        char *sep = strchr(value, strcmp(argv[i], "--env") == 0 ? '=' : ':');
        if (!sep || (strcmp(argv[i], "--env") != 0 && strcmp(argv[i], "--dir") != 0) ||
            n_env >= MAX_ITEMS || n_dirs >= MAX_ITEMS) {
            fprintf(stderr, "usage: wasmforge-run [--dir GUEST:HOST[:ro]]... [--env K=V]... [--inherit-env] "
                            "[--timeout SECONDS] MODULE.wasm [ARGS...]\n");
            return 2;
        }
        *sep = '\0';
        if (strcmp(argv[i], "--env") == 0) { env_names[n_env] = value; env_values[n_env++] = sep + 1; }
        else { dirs[n_dirs++] = value; }
    }
    if (i >= argc) {
        fprintf(stderr, "usage: wasmforge-run [--dir GUEST:HOST[:ro]]... [--env K=V]... MODULE.wasm [ARGS...]\n");
        return 2;
    }
    const char *wasm = argv[i];
    wasm_engine_t *engine = NULL;
    wasmtime_module_t *module = load(wasm, &engine);

    wasmtime_store_t *store = wasmtime_store_new(engine, NULL, NULL);
    wasmtime_context_t *context = wasmtime_store_context(store);
    wasi_config_t *wasi = wasi_config_new();
    /* argv[0] is the program's name without directory and suffix, as the runner gives it. */
    const char *base = strrchr(wasm, '/') ? strrchr(wasm, '/') + 1 : wasm;
    char *name = strdup(base);
    if (strlen(name) > 5 && strcmp(name + strlen(name) - 5, ".wasm") == 0) name[strlen(name) - 5] = '\0';
    const char **args = (const char **)malloc(sizeof(char *) * (size_t)(argc - i));
    args[0] = name;
    for (int k = i + 1; k < argc; k++) args[k - i] = argv[k];
    wasi_config_set_argv(wasi, (size_t)(argc - i), args);
    if (inherit_env) wasi_config_inherit_env(wasi);  /* the host's environment, as run-tests passes it */
    else wasi_config_set_env(wasi, n_env, env_names, env_values);
    wasi_config_inherit_stdin(wasi);
    wasi_config_inherit_stdout(wasi);
    wasi_config_inherit_stderr(wasi);
    for (size_t d = 0; d < n_dirs; d++) {
        char *host = dirs[d] + strlen(dirs[d]) + 1;
        /* GUEST:HOST:ro: the guest can read the directory but not change it (as the other runners). */
        size_t len = strlen(host);
        bool mutable = !(len > 3 && strcmp(host + len - 3, ":ro") == 0);
        if (!mutable) host[len - 3] = '\0';
        if (!wasi_config_preopen_dir(wasi, host, dirs[d], mutable)) {
            fprintf(stderr, "wasmforge-run: cannot preopen %s as %s\n", host, dirs[d]);
            return 1;
        }
    }
    wasmtime_error_t *error = wasmtime_context_set_wasi(context, wasi);
    if (error) fail("cannot set up WASI", error, NULL);

    wasmtime_linker_t *linker = wasmtime_linker_new(engine);
    if ((error = wasmtime_linker_define_wasi(linker))) fail("cannot define WASI", error, NULL);
    wasmtime_linker_allow_shadowing(linker, true);
    wasm_valtype_t *i32 = wasm_valtype_new(WASM_I32);
    wasm_valtype_vec_t params, results;
    wasm_valtype_vec_new(&params, 1, &i32);
    wasm_valtype_vec_new_empty(&results);
    wasm_functype_t *type = wasm_functype_new(&params, &results);
    error = wasmtime_linker_define_func(linker, "wasi_snapshot_preview1", 22, "proc_exit", 9, type, proc_exit, NULL,
                                        NULL);
    if (error) fail("cannot define proc_exit", error, NULL);
    if ((error = wasmtime_linker_module(linker, context, "", 0, module))) fail("cannot instantiate", error, NULL);
    wasmtime_func_t start;
    if ((error = wasmtime_linker_get_default(linker, context, "", 0, &start))) fail("no _start", error, NULL);
    pthread_t timer;
    if (timeout_seconds > 0 && pthread_create(&timer, NULL, watchdog, NULL) == 0) pthread_detach(timer);
    wasm_trap_t *trap = NULL;
    error = wasmtime_func_call(context, &start, NULL, 0, NULL, 0, &trap);
    fflush(stdout);
    if (exit_status >= 0) return exit_status;
    if (error) fail("the program failed", error, NULL);
    if (trap) fail("trapped", NULL, trap);
    return 0;
}
