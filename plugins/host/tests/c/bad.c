/* Misbehaving plugins for the sandbox tests, one per -D flag. Each exports the full ABI. */
#include <lode_plugin.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char err[256];
static uint8_t loot[256];
static size_t loot_len;

#ifdef INIT_WRITE
/* An initializer that tries to write a file: it must already run inside the sandbox. */
__attribute__((constructor)) static void init_write(void) {
    int fd = open(MARKER, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) { if (write(fd, "escaped", 7) < 0) {} close(fd); }
}
#endif

uint32_t lode_plugin_abi_version(void) {
#ifdef WRONG_ABI
    return 2;
#else
    return LODE_PLUGIN_ABI_VERSION;
#endif
}
const char *lode_plugin_name(void) { return "bad"; }
uint32_t lode_plugin_input_mode(void) { return LODE_INPUT_BYTES; }
void *lode_plugin_new(const uint8_t *a, size_t n) { (void)a; (void)n; return calloc(1, 8); }

int32_t lode_plugin_feed(void *state, const uint8_t *data, size_t len) {
    (void)state; (void)data; (void)len;
#ifdef SEGV
    *(volatile int *)0 = 1;
#endif
#ifdef LOOP
    for (volatile unsigned long i = 0;; i++) {}
#endif
#ifdef ALLOC
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p) { snprintf(err, sizeof err, "out of memory"); return -1; }
        memset(p, 1, 1 << 20);
    }
#endif
#ifdef READ_PASSWD
    int fd = open("/etc/passwd", O_RDONLY);
    if (fd < 0) { snprintf(err, sizeof err, "open /etc/passwd refused"); return -1; }
    ssize_t n = read(fd, loot, sizeof loot);
    loot_len = n > 0 ? (size_t)n : 0;
    close(fd);
#endif
#ifdef WRITE_FILE
    int fd = open(MARKER, O_WRONLY | O_CREAT, 0644);
    if (fd < 0) { snprintf(err, sizeof err, "create refused"); return -1; }
    if (write(fd, "escaped", 7) < 0) {}
    close(fd);
#endif
#ifdef SOCKET
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) { snprintf(err, sizeof err, "socket refused"); return -1; }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(PORT);
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) { loot_len = 9; memcpy(loot, "connected", 9); }
    close(s);
#endif
#ifdef EXEC
    char *argv[] = {"/bin/sh", "-c", "touch " MARKER, NULL};
    execv("/bin/sh", argv);
    snprintf(err, sizeof err, "exec refused");
    if (system("touch " MARKER) != 0) {}
    return -1;
#endif
    return 0;
}

int32_t lode_plugin_finish(void *state, lode_buf *out) {
    free(state);
#ifdef HUGE_RESULT
    size_t n = 64u << 20;
#else
    size_t n = loot_len;
#endif
    out->ptr = malloc(n ? n : 1);
    if (!out->ptr) return -1;
    if (loot_len) memcpy(out->ptr, loot, loot_len); else memset(out->ptr, 'x', n);
    out->len = n;
    return 0;
}

#ifndef NO_COMBINE
int32_t lode_plugin_combine(const lode_buf *parts, size_t n, lode_buf *out) {
    (void)parts; (void)n;
    out->ptr = malloc(1); out->len = 0;
    return 0;
}
#endif

void lode_plugin_free(lode_buf buf) { free(buf.ptr); }
const char *lode_plugin_last_error(void) { return err[0] ? err : NULL; }
