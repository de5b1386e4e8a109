/* linecount: counts '\n' bytes, written in C against plugins/sdk/include/lode_plugin.h to show the
 * ABI is language-neutral.
 *   cc -shared -fPIC -O2 -I plugins/sdk/include -o liblinecount.so plugins/examples/c/linecount.c
 * Partial: one little-endian uint64. Render: "<n> lines\n". */
#include <lode_plugin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t lines;
} state_t;

uint32_t lode_plugin_abi_version(void) { return LODE_PLUGIN_ABI_VERSION; }
const char *lode_plugin_name(void) { return "linecount"; }
uint32_t lode_plugin_input_mode(void) { return LODE_INPUT_BYTES; }

void *lode_plugin_new(const uint8_t *args_json, size_t len) {
    (void)args_json;
    (void)len;
    return calloc(1, sizeof(state_t));
}

int32_t lode_plugin_feed(void *state, const uint8_t *data, size_t len) {
    state_t *s = state;
    for (size_t i = 0; i < len; i++) s->lines += data[i] == '\n';
    return 0;
}

static int32_t give_u64(uint64_t v, lode_buf *out) {
    out->ptr = malloc(8);
    if (!out->ptr) return -1;
    for (int i = 0; i < 8; i++) out->ptr[i] = (uint8_t)(v >> (8 * i));
    out->len = 8;
    return 0;
}

static uint64_t read_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

int32_t lode_plugin_finish(void *state, lode_buf *out) {
    uint64_t n = ((state_t *)state)->lines;
    free(state);
    return give_u64(n, out);
}

int32_t lode_plugin_combine(const lode_buf *parts, size_t n, lode_buf *out) {
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) {
        if (parts[i].len != 8) return -1;
        sum += read_u64(parts[i].ptr);
    }
    return give_u64(sum, out);
}

int32_t lode_plugin_render(const uint8_t *partial, size_t len, lode_buf *out) {
    if (len != 8) return -1;
    char text[64];
    int n = snprintf(text, sizeof text, "%llu lines\n", (unsigned long long)read_u64(partial));
    out->ptr = malloc((size_t)n);
    if (!out->ptr) return -1;
    memcpy(out->ptr, text, (size_t)n);
    out->len = (size_t)n;
    return 0;
}

void lode_plugin_free(lode_buf buf) { free(buf.ptr); }

const char *lode_plugin_last_error(void) { return NULL; }
