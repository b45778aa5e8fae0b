/*
 * test_config.c: `tern serve --config` files (src/server/config.c) and
 * tn_parse_size. Good files round-trip every field; each bad file is
 * written to a temp file and must fail with its status and a message that
 * names the key and the line.
 */
#include <unistd.h>

#include "server/config.h"
#include "tn_test.h"

/* Writes text to a fresh temp file; returns its path (static buffer). */
static const char *write_tmp(const char *text, size_t len) {
  static char path[64];
  snprintf(path, sizeof path, "/tmp/tn_config_XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return NULL;
  size_t off = 0;
  while (off < len) {
    ssize_t w = write(fd, text + off, len - off);
    if (w <= 0) break;
    off += (size_t)w;
  }
  close(fd);
  return off == len ? path : NULL;
}

/* Loads text from a temp file; returns the status, message in err. */
static enum tn_status load_text(const char *text, struct tn_serve_config *cfg,
                                struct tn_error *err) {
  const char *path = write_tmp(text, strlen(text));
  if (!path) return TN_EIO;
  enum tn_status st = tn_serve_config_load(path, cfg, err);
  unlink(path);
  return st;
}

static const char k_full[] =
    "# a full config\n"
    "host: 0.0.0.0\n"
    "port: 9000\n"
    "api_key: \"s3cret: with colon\"\n"
    "threads: 3\n"
    "models:\n"
    "  - name: smollm2\n"
    "    path: models/SmolLM2-135M-Instruct.Q4_1.gguf\n"
    "    aliases: [default, small]\n"
    "    threads: 2\n"
    "    ctx: 2048\n"
    "    max_seqs: 16\n"
    "    kv_mem: 256MiB\n"
    "  - path: gemma-3-270m\n"           /* keys in any order */
    "    name: 'gemma'\n"
    "    aliases:\n"
    "      - g3\n"
    "      - \"org/gemma:270m\"\n"
    "    kv_mem: 1000000\n"
    "    chat_template: gemma\n"
    "    spec: self\n"
    "    spec_layers: 0-7,17\n"
    "    spec_max_tokens: 4\n"
    "  - {name: qwen, path: qwen.gguf, ctx: 16777216, kv_mem: 2GB,\n"
    "     spec: draft, draft_model: qwen-small.gguf, price_prompt: 0.15,\n"
    "     price_compute: 0.9,\n"
    "     price_completion: 2, price_cached: .075}\n";

static void test_good_full(void) {
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  enum tn_status st = load_text(k_full, &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_STR_EQ(cfg.host, "0.0.0.0");
  ASSERT_EQ(cfg.port, 9000);
  ASSERT_STR_EQ(cfg.api_key, "s3cret: with colon");
  ASSERT_EQ(cfg.threads, 3);
  ASSERT_EQ(cfg.n_models, 3);
  const struct tn_serve_model_cfg *m = &cfg.models[0];
  ASSERT_STR_EQ(m->name, "smollm2");
  ASSERT_STR_EQ(m->path, "models/SmolLM2-135M-Instruct.Q4_1.gguf");
  ASSERT_EQ(m->n_aliases, 2);
  ASSERT_STR_EQ(m->aliases[0], "default");
  ASSERT_STR_EQ(m->aliases[1], "small");
  ASSERT_EQ(m->threads, 2);
  ASSERT_EQ(m->ctx, 2048);
  ASSERT_EQ(m->max_seqs, 16);
  ASSERT_EQ(m->kv_mem, 256ll << 20);
  ASSERT(m->chat_template == NULL);
  m = &cfg.models[1];
  ASSERT_STR_EQ(m->name, "gemma");
  ASSERT_STR_EQ(m->path, "gemma-3-270m");
  ASSERT_EQ(m->n_aliases, 2);
  ASSERT_STR_EQ(m->aliases[0], "g3");
  ASSERT_STR_EQ(m->aliases[1], "org/gemma:270m");
  ASSERT_EQ(m->threads, 0);
  ASSERT_EQ(m->ctx, 0);
  ASSERT_EQ(m->max_seqs, 0);
  ASSERT_EQ(m->kv_mem, 1000000);
  ASSERT_STR_EQ(m->chat_template, "gemma");
  ASSERT_STR_EQ(m->spec, "self");
  ASSERT_STR_EQ(m->spec_layers, "0-7,17");
  ASSERT_EQ(m->spec_max_tokens, 4);
  m = &cfg.models[2];
  ASSERT_STR_EQ(m->name, "qwen");
  ASSERT_STR_EQ(m->spec, "draft");
  ASSERT_STR_EQ(m->draft_model, "qwen-small.gguf");
  ASSERT_STR_EQ(m->path, "qwen.gguf");
  ASSERT_EQ(m->n_aliases, 0);
  ASSERT_EQ(m->ctx, 1 << 24);
  ASSERT_EQ(m->kv_mem, 2000000000ll);
  ASSERT(m->price_prompt == 0.15 && m->price_completion == 2 &&
         m->price_cached == 0.075 && m->price_compute == 0.9);
  ASSERT(cfg.models[0].price_prompt < 0 && cfg.models[0].price_cached < 0 &&
         cfg.models[0].price_completion < 0);

  ASSERT_EQ(tn_serve_config_find(&cfg, "smollm2"), 0);
  ASSERT_EQ(tn_serve_config_find(&cfg, "default"), 0);
  ASSERT_EQ(tn_serve_config_find(&cfg, "small"), 0);
  ASSERT_EQ(tn_serve_config_find(&cfg, "gemma"), 1);
  ASSERT_EQ(tn_serve_config_find(&cfg, "org/gemma:270m"), 1);
  ASSERT_EQ(tn_serve_config_find(&cfg, "qwen"), 2);
  ASSERT_EQ(tn_serve_config_find(&cfg, "Qwen"), -1);
  ASSERT_EQ(tn_serve_config_find(&cfg, NULL), -1);
  ASSERT_EQ(tn_serve_config_find(NULL, "qwen"), -1);
  tn_serve_config_free(&cfg);
  ASSERT_EQ(cfg.n_models, 0);
  ASSERT(cfg.models == NULL);
  tn_serve_config_free(&cfg); /* twice is fine: it was zeroed */
  tn_serve_config_free(NULL);
}

static void test_adapters(void) {
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  enum tn_status st = load_text(
      "models:\n  - name: m\n    path: x.gguf\n    adapters:\n"
      "      - name: sql\n        path: a/sql.gguf\n"
      "      - {name: pirate, path: dir, scale: -0.5}\n",
      &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT_EQ(cfg.models[0].n_adapters, 2);
  ASSERT_STR_EQ(cfg.models[0].adapters[0].name, "sql");
  ASSERT_STR_EQ(cfg.models[0].adapters[0].path, "a/sql.gguf");
  ASSERT(cfg.models[0].adapters[0].scale == 1.0f);
  ASSERT_STR_EQ(cfg.models[0].adapters[1].name, "pirate");
  ASSERT(cfg.models[0].adapters[1].scale == -0.5f);
  tn_serve_config_free(&cfg);
}

/* Shadows on a model (defaults), an adapter as the target of its own
 * base model, and a route's shadow with every key. */
static void test_shadows(void) {
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  enum tn_status st = load_text(
      "models:\n  - name: m\n    path: x.gguf\n"
      "    adapters: [{name: sql, path: a.gguf}]\n"
      "    shadow: {target: sql}\n"
      "  - name: n\n    path: y.gguf\n"
      "routes:\n  - name: r\n    strategy: fallback\n    targets: [m]\n"
      "    shadow: {target: n, share: 0.25, judge: m, max_concurrent: 2,"
      " queue: 9, timeout_s: 30}\n",
      &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  const struct tn_serve_shadow_cfg *a = &cfg.models[0].shadow;
  ASSERT_STR_EQ(a->target, "sql");
  ASSERT(a->share == 1.0 && a->judge == NULL && a->timeout_s == 300);
  ASSERT_EQ(a->max_concurrent, 1);
  ASSERT_EQ(a->queue, 64);
  ASSERT(cfg.models[1].shadow.target == NULL);
  const struct tn_serve_shadow_cfg *b = &cfg.routes[0].shadow;
  ASSERT_STR_EQ(b->target, "n");
  ASSERT_STR_EQ(b->judge, "m");
  ASSERT(b->share == 0.25 && b->timeout_s == 30);
  ASSERT_EQ(b->max_concurrent, 2);
  ASSERT_EQ(b->queue, 9);
  tn_serve_config_free(&cfg);
}

static void test_good_minimal(void) {
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  /* explicit document markers, an anchor that is never referenced, an
   * empty alias list */
  enum tn_status st = load_text(
      "---\nmodels:\n- name: &n m\n  path: x.gguf\n  aliases: []\n...\n",
      &cfg, &err);
  if (st) fprintf(stderr, "error: %s\n", err.msg);
  ASSERT_EQ(st, TN_OK);
  ASSERT(cfg.host == NULL);
  ASSERT(cfg.api_key == NULL);
  ASSERT_EQ(cfg.port, 0);
  ASSERT_EQ(cfg.n_models, 1);
  ASSERT_STR_EQ(cfg.models[0].name, "m");
  ASSERT_STR_EQ(cfg.models[0].path, "x.gguf");
  ASSERT_EQ(cfg.models[0].n_aliases, 0);
  ASSERT_EQ(cfg.models[0].kv_mem, 0);
  tn_serve_config_free(&cfg);

  /* parsing from memory gives the same, with the given label in errors */
  const char text[] = "models:\n  - name: a\n    path: b\n";
  ASSERT_EQ(tn_serve_config_parse(text, sizeof text - 1, "mem.yaml", &cfg,
                                  &err),
            TN_OK);
  ASSERT_STR_EQ(cfg.models[0].path, "b");
  tn_serve_config_free(&cfg);
  const char bad[] = "models: []\n";
  ASSERT_EQ(tn_serve_config_parse(bad, sizeof bad - 1, "mem.yaml", &cfg,
                                  &err),
            TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "mem.yaml:1: models:");
}

/* ---- bad configs */

struct bad_case {
  const char *text;
  enum tn_status status;
  const char *msg; /* a substring of the message, ":LINE: KEY: ..." */
};

#define MODEL_OK "models:\n  - name: a\n    path: p\n"

static const struct bad_case k_bad[] = {
    /* YAML syntax */
    {"port: 1\nhost: x: y\n" MODEL_OK, TN_EFORMAT, ":2: YAML syntax error"},
    {MODEL_OK "    aliases: [x, y\n", TN_EFORMAT, "YAML syntax error"},
    {"models:\n  - name: a\n    path: 'p\n", TN_EFORMAT, "YAML syntax error"},
    {"models:\n  - name: a\n    path: p\n    - x\n", TN_EFORMAT,
     ":4: YAML syntax error: while parsing a block mapping did not find "
     "expected key"},
    {"host: \"unterminated\nmodels: []\n", TN_EFORMAT, "YAML syntax error"},
    {"host: \xff\xfe\n" MODEL_OK, TN_EFORMAT,
     "invalid YAML text at byte 6: invalid leading UTF-8 octet"},
    {"\tport: 1\n", TN_EFORMAT, ":1: YAML syntax error"},
    /* shape */
    {"", TN_EINVAL, ":1: the config is empty"},
    {"# only a comment\n", TN_EINVAL, "the config is empty"},
    {"- a\n- b\n", TN_EINVAL, ":1: the config must be a mapping"},
    {"just text\n", TN_EINVAL, "the config must be a mapping"},
    {MODEL_OK "---\n" MODEL_OK, TN_EINVAL, ":4: more than one YAML document"},
    {"? [a, b]\n: c\n" MODEL_OK, TN_EINVAL, ":1: expected a key, got a list"},
    /* top-level keys */
    {"hots: x\n" MODEL_OK, TN_EINVAL,
     ":1: unknown key 'hots' (expected host, port, api_key, threads, models, upstreams, routes or tenants)"},
    {"port: 1\n" MODEL_OK "port: 2\n", TN_EINVAL, ":5: duplicate key 'port'"},
    {"port: [8080]\n" MODEL_OK, TN_EINVAL, ":1: port: expected a value, got a list"},
    {"port: {a: 1}\n" MODEL_OK, TN_EINVAL, ":1: port: expected a value, got a mapping"},
    {"port: 70000\n" MODEL_OK, TN_EINVAL, ":1: port: 70000 is out of range 1..65535"},
    {"port: 0\n" MODEL_OK, TN_EINVAL, "port: 0 is out of range 1..65535"},
    {"port: -80\n" MODEL_OK, TN_EINVAL, "port: -80 is out of range"},
    {"port: http\n" MODEL_OK, TN_EINVAL, ":1: port: 'http' is not an integer"},
    {"port: 8080x\n" MODEL_OK, TN_EINVAL, "port: '8080x' is not an integer"},
    {"port: 99999999999999999999999\n" MODEL_OK, TN_EINVAL,
     "port: 99999999999999999999999 is out of range"},
    {"port:\n" MODEL_OK, TN_EINVAL, ":1: port: expected a value, got null"},
    {"host: ~\n" MODEL_OK, TN_EINVAL, "host: expected a value, got null"},
    {"host: ''\n" MODEL_OK, TN_EINVAL, ":1: host: value is empty"},
    {"api_key: [a]\n" MODEL_OK, TN_EINVAL, "api_key: expected a value, got a list"},
    {"host: \"a\\0b\"\n" MODEL_OK, TN_EINVAL, "host: value contains a NUL"},
    /* models */
    {"host: x\n", TN_EINVAL, ":1: missing key 'models'"},
    {"models: []\n", TN_EINVAL, ":1: models: the list is empty"},
    {"models:\n", TN_EINVAL, ":1: models: expected a list of models, got a scalar"},
    {"models: {name: a, path: p}\n", TN_EINVAL,
     "models: expected a list of models, got a mapping"},
    {"models:\n  - smollm2\n", TN_EINVAL,
     ":2: models[0]: expected a mapping with name and path, got a scalar"},
    {MODEL_OK "  - path: q\n", TN_EINVAL, ":4: models[1]: missing key 'name'"},
    {"models:\n  - name: a\n", TN_EINVAL, ":2: models[0]: missing key 'path' (model 'a')"},
    {MODEL_OK "    thread: 2\n", TN_EINVAL,
     ":4: models[0]: unknown key 'thread' (expected name, path, aliases, "
     "threads, ctx, max_seqs, kv_mem, chat_template, spec, spec_max_tokens, "
     "draft_model, spec_layers, price_prompt, price_compute, price_cached, "
     "price_completion, adapters, max_loras, adapter_mem or shadow)"},
    {MODEL_OK "    shadow: {target: a}\n", TN_EINVAL,
     ":4: models[0].shadow.target: 'a' is the name it shadows"},
    {MODEL_OK "    shadow: {target: zz}\n", TN_EINVAL,
     ":4: models[0].shadow.target: unknown target 'zz'"},
    {MODEL_OK "    shadow: {target: a, share: -0.1}\n", TN_EINVAL,
     ":4: models[0].shadow.share: '-0.1' is not a share in [0, 1]"},
    {MODEL_OK "    shadow: {target: a, max_concurrent: 65}\n", TN_EINVAL,
     "models[0].shadow.max_concurrent"},
    {MODEL_OK "    shadow: {target: a, timeout_s: 0}\n", TN_EINVAL,
     "models[0].shadow.timeout_s: '0' is not a number of seconds"},
    {MODEL_OK "    shadow: [a]\n", TN_EINVAL,
     ":4: models[0].shadow: expected a mapping with target"},
    {MODEL_OK "    adapters: x\n", TN_EINVAL,
     ":4: models[0].adapters: expected a list of {name, path, scale}"},
    {MODEL_OK "    adapters:\n      - name: a\n        path: q\n",
     TN_EINVAL, "'a' is already the name of model 'a'"},
    {MODEL_OK "    adapters:\n      - {name: b, path: p}\n      - {name: b, "
     "path: q}\n", TN_EINVAL, "'b' is already an adapter of model 'a'"},
    {MODEL_OK "    adapters:\n      - {name: .x, path: p}\n", TN_EINVAL,
     "an adapter name is"},
    {MODEL_OK "    adapters:\n      - {name: b, path: p, scale: 1e9}\n",
     TN_EINVAL, "is not a number in [-16, 16]"},
    {MODEL_OK "    adapters:\n      - {name: b}\n", TN_EINVAL,
     "an adapter needs 'name' and 'path'"},
    {MODEL_OK "    adapters:\n      - {name: b, path: p, rank: 2}\n",
     TN_EINVAL, "unknown key 'rank'"},
    {MODEL_OK "    price_prompt: -1\n", TN_EINVAL,
     ":4: models[0].price_prompt: '-1' is not a price"},
    {MODEL_OK "    price_completion: 1e3\n", TN_EINVAL,
     "models[0].price_completion: '1e3' is not a price"},
    {MODEL_OK "    price_cached: .\n", TN_EINVAL,
     "models[0].price_cached: '.' is not a price"},
    {MODEL_OK "    price_prompt: 2000000\n", TN_EINVAL,
     "models[0].price_prompt: '2000000' is not a price"},
    {MODEL_OK "    name: b\n", TN_EINVAL, ":4: models[0]: duplicate key 'name'"},
    {"models:\n  - name: [a]\n    path: p\n", TN_EINVAL,
     ":2: models[0].name: expected a value, got a list"},
    {"models:\n  - name: a b\n    path: p\n", TN_EINVAL,
     "models[0].name: 'a b' contains whitespace or a control character"},
    {"models:\n  - name: \"\"\n    path: p\n", TN_EINVAL,
     "models[0].name: value is empty"},
    {"models:\n  - name: a\n    path: {x: 1}\n", TN_EINVAL,
     ":3: models[0].path: expected a value, got a mapping"},
    {MODEL_OK "    threads: 0\n", TN_EINVAL,
     ":4: models[0].threads: 0 is out of range 1..256"},
    {MODEL_OK "    threads: two\n", TN_EINVAL,
     "models[0].threads: 'two' is not an integer"},
    {MODEL_OK "    ctx: 1.5\n", TN_EINVAL, "models[0].ctx: '1.5' is not an integer"},
    {MODEL_OK "    ctx: 16777217\n", TN_EINVAL,
     "models[0].ctx: 16777217 is out of range 1..16777216"},
    {MODEL_OK "    max_seqs: 5000\n", TN_EINVAL,
     "models[0].max_seqs: 5000 is out of range 1..4096"},
    {MODEL_OK "    kv_mem: 12XB\n", TN_EINVAL,
     ":4: models[0].kv_mem: size '12XB' has an unknown unit 'XB'"},
    {MODEL_OK "    kv_mem: -5M\n", TN_EINVAL,
     "models[0].kv_mem: size '-5M' is not a number of bytes"},
    {MODEL_OK "    kv_mem: 0\n", TN_EINVAL, "models[0].kv_mem: size must be positive"},
    {MODEL_OK "    kv_mem: 99999999999T\n", TN_EINVAL,
     "models[0].kv_mem: size '99999999999T' is too large"},
    {MODEL_OK "    kv_mem: [1]\n", TN_EINVAL,
     "models[0].kv_mem: expected a value, got a list"},
    /* aliases */
    {MODEL_OK "    aliases: x\n", TN_EINVAL,
     ":4: models[0].aliases: expected a list of names, got a scalar"},
    {MODEL_OK "    aliases: [[x]]\n", TN_EINVAL,
     ":4: models[0].aliases[0]: expected a name, got a list"},
    {MODEL_OK "    aliases: [x, ~]\n", TN_EINVAL,
     "models[0].aliases[1]: expected a name, got null"},
    {MODEL_OK "    aliases: [\"x\\ty\"]\n", TN_EINVAL,
     "models[0].aliases[0]: 'x\ty' contains whitespace"},
    /* uniqueness */
    {MODEL_OK "  - name: a\n    path: q\n", TN_EINVAL,
     ":4: models[1].name: 'a' is already the name of model 'a'"},
    {MODEL_OK "    aliases: [x]\n  - name: b\n    path: q\n    aliases: [y, x]\n",
     TN_EINVAL, ":7: models[1].aliases[1]: 'x' is already the alias of model 'a'"},
    {MODEL_OK "    aliases: [a]\n", TN_EINVAL,
     ":4: models[0].aliases[0]: 'a' is already the name of model 'a'"},
    {MODEL_OK "    aliases: [x, x]\n", TN_EINVAL,
     "models[0].aliases[1]: 'x' is already the alias of model 'a'"},
    {MODEL_OK "    aliases: [x]\n  - name: x\n    path: q\n", TN_EINVAL,
     ":5: models[1].name: 'x' is already the alias of model 'a'"},
    {"models:\n  - aliases: [x]\n    name: x\n    path: q\n", TN_EINVAL,
     ":3: models[0].name: 'x' is already the alias of models[0]"},
    /* YAML aliases: refused, which defuses expansion bombs */
    {"host: &h example\napi_key: *h\n" MODEL_OK, TN_EINVAL,
     ":2: api_key: YAML aliases (*h) are not allowed"},
    {"a: &a [x, x, x, x, x, x, x, x, x]\n"
     "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
     TN_EINVAL, ":1: unknown key 'a'"},
    {"models:\n  - &m {name: a, path: p}\n  - *m\n", TN_EINVAL,
     ":3: models[1]: YAML aliases (*m) are not allowed"},
    {"models: &l [{name: a, path: p}]\nhost: *l\n", TN_EINVAL,
     ":2: host: YAML aliases (*l) are not allowed"},
};

static void test_bad(void) {
  int bad = 0;
  for (size_t i = 0; i < TN_ARRAY_LEN(k_bad); i++) {
    struct tn_serve_config cfg;
    struct tn_error err = {0};
    enum tn_status st = load_text(k_bad[i].text, &cfg, &err);
    if (st != k_bad[i].status || !strstr(err.msg, k_bad[i].msg)) {
      fprintf(stderr, "case %zu: got %d \"%s\", want %d \"%s\"\n", i,
              (int)st, err.msg, (int)k_bad[i].status, k_bad[i].msg);
      bad++;
    }
    if (!st) tn_serve_config_free(&cfg);
  }
  ASSERT_EQ(bad, 0);
  for (size_t i = 0; i < TN_ARRAY_LEN(k_bad); i++) {
    struct tn_serve_config cfg;
    memset(&cfg, 0x5a, sizeof cfg); /* must be zeroed on failure */
    struct tn_error err = {0};
    enum tn_status st = load_text(k_bad[i].text, &cfg, &err);
    ASSERT_EQ(st, k_bad[i].status);
    ASSERT_EQ(err.status, k_bad[i].status);
    ASSERT_SUBSTR(err.msg, k_bad[i].msg);
    ASSERT_SUBSTR(err.msg, "/tmp/tn_config_"); /* names the file */
    ASSERT(cfg.models == NULL && cfg.host == NULL && cfg.api_key == NULL);
    ASSERT_EQ(cfg.n_models, 0);
  }
  printf("     %zu bad configs rejected\n", TN_ARRAY_LEN(k_bad));
}

static void test_bad_limits(void) {
  struct tn_serve_config cfg;
  struct tn_error err = {0};
  /* a name one byte too long */
  char text[4096];
  char name[TN_SERVE_NAME_MAX + 2];
  memset(name, 'n', sizeof name - 1);
  name[sizeof name - 1] = '\0';
  snprintf(text, sizeof text, "models:\n  - name: %s\n    path: p\n", name);
  ASSERT_EQ(load_text(text, &cfg, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, ":2: models[0].name: name is 129 bytes long");
  name[TN_SERVE_NAME_MAX] = '\0'; /* exactly the limit is fine */
  snprintf(text, sizeof text, "models:\n  - name: %s\n    path: p\n", name);
  ASSERT_EQ(load_text(text, &cfg, &err), TN_OK);
  tn_serve_config_free(&cfg);

  /* too many models */
  size_t cap = 64 * 1024;
  char *big = malloc(cap);
  ASSERT(big);
  size_t n = (size_t)snprintf(big, cap, "models:\n");
  for (int i = 0; i <= TN_SERVE_MODELS_MAX; i++)
    n += (size_t)snprintf(big + n, cap - n, "  - {name: m%d, path: p}\n", i);
  ASSERT_EQ(load_text(big, &cfg, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "models: more than 64 models");

  /* too many aliases */
  n = (size_t)snprintf(big, cap, MODEL_OK "    aliases: [");
  for (int i = 0; i <= TN_SERVE_ALIASES_MAX; i++)
    n += (size_t)snprintf(big + n, cap - n, "%sx%d", i ? ", " : "", i);
  snprintf(big + n, cap - n, "]\n");
  ASSERT_EQ(load_text(big, &cfg, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "models[0].aliases: more than 64 aliases");
  free(big);

  /* a file over 1 MiB */
  size_t huge = (1u << 20) + 16;
  char *h = malloc(huge + 1);
  ASSERT(h);
  memset(h, '#', huge);
  h[huge] = '\0';
  ASSERT_EQ(load_text(h, &cfg, &err), TN_EINVAL);
  ASSERT_SUBSTR(err.msg, "too large for a config");
  free(h);

  /* deep nesting is refused at the first level that does not fit */
  char deep[20100];
  memset(deep, '[', 20000);
  memcpy(deep, "host: ", 6);
  deep[20000] = '\0';
  ASSERT_NE(load_text(deep, &cfg, &err), TN_OK);
  ASSERT_SUBSTR(err.msg, "host: expected a value, got a list");

  /* a raw NUL byte in the file */
  static const char nul[] = "models:\n  - name: a\0b\n    path: p\n";
  const char *path = write_tmp(nul, sizeof nul - 1);
  ASSERT(path);
  enum tn_status st = tn_serve_config_load(path, &cfg, &err);
  unlink(path);
  ASSERT_EQ(st, TN_EFORMAT);
  ASSERT_SUBSTR(err.msg, "invalid YAML text at byte 19: control characters");

  /* a missing file */
  ASSERT_EQ(tn_serve_config_load("/nonexistent/tern.yaml", &cfg, &err),
            TN_ENOENT);
  ASSERT_SUBSTR(err.msg, "/nonexistent/tern.yaml");
  ASSERT(cfg.models == NULL);
  /* a directory */
  ASSERT_EQ(tn_serve_config_load("/tmp", &cfg, &err), TN_EIO);
}

/* ---- sizes */

static void test_parse_size(void) {
  static const struct {
    const char *s;
    int64_t v;
  } good[] = {
      {"0", 0},
      {"1", 1},
      {"512B", 512},
      {"1K", 1024},
      {"1k", 1024},
      {"1KiB", 1024},
      {"1kib", 1024},
      {"1KB", 1000},
      {"256MiB", 256ll << 20},
      {"256M", 256ll << 20},
      {"3MB", 3000000},
      {"2G", 2ll << 30},
      {"2GiB", 2ll << 30},
      {"2GB", 2000000000ll},
      {"1T", 1ll << 40},
      {"1TB", 1000000000000ll},
      {"9223372036854775807", INT64_MAX},
      {"8388607TiB", 8388607ll << 40},
      {"007", 7},
  };
  for (size_t i = 0; i < TN_ARRAY_LEN(good); i++) {
    int64_t v = -1;
    struct tn_error err = {0};
    if (tn_parse_size(good[i].s, &v, &err) != TN_OK)
      fprintf(stderr, "'%s': %s\n", good[i].s, err.msg);
    ASSERT_EQ(tn_parse_size(good[i].s, &v, &err), TN_OK);
    ASSERT_EQ(v, good[i].v);
  }
  static const struct {
    const char *s;
    const char *msg;
  } bad[] = {
      {"", "size is empty"},
      {"-1", "'-1' is not a number of bytes"},
      {"+1", "'+1' is not a number of bytes"},
      {"M", "'M' is not a number of bytes"},
      {" 1", "is not a number of bytes"},
      {"1 M", "unknown unit ' M'"},
      {"1.5G", "unknown unit '.5G'"},
      {"1MiBx", "unknown unit 'MiBx'"},
      {"12XB", "unknown unit 'XB'"},
      {"0x10", "unknown unit 'x10'"},
      {"9223372036854775808", "is too large"},
      {"99999999999999999999999", "is too large"},
      {"8388608TiB", "is too large"},
      {"9000000000G", "is too large"},
  };
  for (size_t i = 0; i < TN_ARRAY_LEN(bad); i++) {
    int64_t v = -1;
    struct tn_error err = {0};
    ASSERT_EQ(tn_parse_size(bad[i].s, &v, &err), TN_EINVAL);
    ASSERT_SUBSTR(err.msg, bad[i].msg);
    ASSERT_EQ(v, 0);
  }
  struct tn_error err;
  ASSERT_EQ(tn_parse_size(NULL, NULL, &err), TN_EINVAL);
  ASSERT_EQ(tn_parse_size("1K", NULL, NULL), TN_OK);
}

TN_TEST_MAIN(TN_TEST(test_good_full), TN_TEST(test_good_minimal),
             TN_TEST(test_adapters), TN_TEST(test_shadows),
             TN_TEST(test_bad), TN_TEST(test_bad_limits),
             TN_TEST(test_parse_size))
