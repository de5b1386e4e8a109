/*
 * lode_plugin.h - the Lode plugin ABI, version 1.
 *
 * A Lode plugin is a shared library that a datanode runs against the blocks it stores, so a scan
 * sends only small partial results over the network. Build one with only a C compiler:
 *
 *     cc -shared -fPIC -O2 -I plugins/sdk/include -o libmyplugin.so myplugin.c
 *
 * Every function below is exported with C linkage. All are required except lode_plugin_render and
 * lode_plugin_last_error.
 *
 * Lifecycle of one task (one split of a file, usually one block):
 *
 *     state = lode_plugin_new(args_json, len);          NULL means the arguments are bad
 *     lode_plugin_feed(state, data, len);               zero or more times; 0 = ok
 *     lode_plugin_finish(state, &partial);              frees state, writes the partial result
 *
 * and, to merge the partial results of all tasks (in any grouping: combine must be associative),
 *
 *     lode_plugin_combine(parts, n, &out);              n >= 1 partials -> one partial
 *     lode_plugin_render(partial, len, &text);          optional: the final result as text for humans
 *
 * Every buffer a plugin hands out (through a lode_buf) stays owned by the plugin until the host
 * passes it back to lode_plugin_free.
 *
 * Input modes:
 *   LODE_INPUT_BYTES  feed gets the raw bytes of the split in order, in chunks of any size.
 *   LODE_INPUT_LINES  feed gets whole records only: the records of the whole file split on '\n',
 *                     each with its trailing '\n' (the file's last record may lack one), each
 *                     record delivered to exactly one task whatever the block boundaries. One feed
 *                     call may hold many records.
 *
 * Arguments: a JSON object whose values are strings, built from `lode scan --arg key=value`.
 * The host adds these keys (a plugin may ignore them):
 *   "_path"    the file's path in Lode
 *   "_offset"  decimal string: the file offset of the first byte this task's feed receives
 *
 * Isolation: a plugin runs in a sandboxed child process (memory, CPU and wall-clock limits; no
 * network, no files beyond its input, no exec). A crash, hang or limit hit fails only that task.
 */
#ifndef LODE_PLUGIN_H
#define LODE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LODE_PLUGIN_ABI_VERSION 1u

#define LODE_INPUT_BYTES 0u
#define LODE_INPUT_LINES 1u

/* A buffer handed from the plugin to the host; owned by the plugin until lode_plugin_free. */
typedef struct lode_buf {
    uint8_t *ptr;
    size_t len;
} lode_buf;

/* Must return LODE_PLUGIN_ABI_VERSION (1). */
uint32_t lode_plugin_abi_version(void);

/* The plugin's name: static, NUL-terminated, [a-z0-9_-]. */
const char *lode_plugin_name(void);

/* LODE_INPUT_BYTES or LODE_INPUT_LINES. */
uint32_t lode_plugin_input_mode(void);

/* New task state from the JSON arguments; NULL if the arguments are bad. */
void *lode_plugin_new(const uint8_t *args_json, size_t len);

/* Feed input; returns 0 on success, anything else fails the task. */
int32_t lode_plugin_feed(void *state, const uint8_t *data, size_t len);

/* Free the state and write the task's partial result to *out; returns 0 on success. */
int32_t lode_plugin_finish(void *state, lode_buf *out);

/* Merge n >= 1 partial results into one partial result; returns 0 on success. Associative. */
int32_t lode_plugin_combine(const lode_buf *parts, size_t n, lode_buf *out);

/* Optional: the final (combined) partial as text for humans; returns 0 on success.
 * Without it, the combined partial is printed as it is. */
int32_t lode_plugin_render(const uint8_t *partial, size_t len, lode_buf *out);

/* Release a buffer this plugin handed out. */
void lode_plugin_free(lode_buf buf);

/* Optional: a static, NUL-terminated description of the last error (for bad arguments and failed
 * calls), or NULL. Called only right after a failing call, from the same thread. */
const char *lode_plugin_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* LODE_PLUGIN_H */
