/*
 * fuzz_config.c: libFuzzer target for `tern serve --config` files
 * (src/server/config.c): models, upstreams, routes, tenants. A config is
 * untrusted input; an accepted one is also handed to the router, which
 * compiles its patterns and builds its tables.
 *
 *   CC=clang cmake -S . -B build-fuzz -G Ninja -DTN_FUZZ=ON -DTN_SANITIZE=ON
 *   ninja -C build-fuzz fuzz_config
 *   ./build-fuzz/fuzz_config -max_total_time=60 -dict=tests/fuzz/config.dict \
 *       /tmp/corpus tests/fuzz/seeds/config
 */
#include <stdint.h>
#include <stdlib.h>

#include "router/router.h"
#include "server/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct tn_serve_config cfg;
  struct tn_error err;
  if (tn_serve_config_parse((const char *)data, size, "fuzz.yaml", &cfg,
                            &err) != TN_OK)
    return 0;
  struct tn_router *r = NULL;
  if (tn_router_create(&cfg, &r, &err) == TN_OK) tn_router_free(r);
  tn_serve_config_free(&cfg);
  return 0;
}
