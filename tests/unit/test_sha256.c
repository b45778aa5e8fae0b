/*
 * test_sha256.c: SHA-256 against the FIPS 180-2 vectors, the padding
 * boundaries (lengths around 56 and 64 bytes, checked with Python's
 * hashlib), updates split at every point agreeing with one update, and
 * the SHA-NI compression function agreeing with the portable one. It
 * includes sha256.c to reach the two (the library's copy is not linked).
 */
#include <stdlib.h>
#include <string.h>

#include "../../src/base/sha256.c"
#include "tn_test.h"

static void hex_of(const void *data, size_t n, char out[65]) {
  struct tn_sha256 s;
  uint8_t d[TN_SHA256_SIZE];
  tn_sha256_init(&s);
  tn_sha256_update(&s, data, n);
  tn_sha256_final(&s, d);
  tn_sha256_hex(d, out);
}

static void test_fips_vectors(void) {
  char hex[65];
  hex_of("", 0, hex);
  ASSERT_STR_EQ(hex,
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  hex_of("abc", 3, hex);
  ASSERT_STR_EQ(hex,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  ASSERT_EQ(strlen(m448) * 8, 448);
  hex_of(m448, strlen(m448), hex);
  ASSERT_STR_EQ(hex,
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  const char *m896 =
      "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
      "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
  ASSERT_EQ(strlen(m896) * 8, 896);
  hex_of(m896, strlen(m896), hex);
  ASSERT_STR_EQ(hex,
                "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

/* One million 'a', fed in one piece and in uneven pieces. */
static void test_million_a(void) {
  const size_t n = 1000000;
  char *a = malloc(n);
  ASSERT(a);
  memset(a, 'a', n);
  const char *want =
      "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
  char hex[65];
  hex_of(a, n, hex);
  if (strcmp(hex, want)) free(a);
  ASSERT_STR_EQ(hex, want);
  struct tn_sha256 s;
  uint8_t d[TN_SHA256_SIZE];
  tn_sha256_init(&s);
  size_t done = 0, step = 1;
  while (done < n) {
    size_t k = TN_MIN(step, n - done);
    tn_sha256_update(&s, a + done, k);
    done += k;
    step = step * 3 % 1001 + 1; /* 1, 4, 13, 40, ... mixed sizes */
  }
  tn_sha256_final(&s, d);
  tn_sha256_hex(d, hex);
  free(a);
  ASSERT_STR_EQ(hex, want);
}

/* Lengths on each side of the padding boundaries. */
static void test_padding_boundaries(void) {
  static const struct {
    size_t len;
    const char *hex;
  } cases[] = {
      {55, "16fa57a0a3423a715d594516339f36189d6b5f93754a9714fef202616a9fabfe"},
      {56, "c37b44e5f1b18554b36966f4f8e08bfbf3164c4b6c10374d12d89850892073c5"},
      {57, "12b234922502022f755ab8550a3d4e202ad39c81d961a4f59ec39d5fd83d15a7"},
      {63, "bbba992d2c85af960fb2987a1fd05e0aa82a3db3c740dd8982a9e273b75e36a3"},
      {64, "66bd4633ed6f71c4ecfa4763bf7ba1c8ec7612de9aa6c0578a7b675207c71e0b"},
      {65, "9f7dc47107b750a1f3d35db5d9547f24ef40da5b731b9540d4f43710a154f6c9"},
      {119, "a3ed307b730fa77c07531300c6e4a282330011d4d4caf6bb7b63ae05950f4b66"},
      {120, "8e3b15d9fea7472655aa069620b7f8c2e55ee1499f763200a7515fe826e99d20"},
      {1000, "095ecb62e30793ab4b954cd6a0586d0cc91f7ea5b1332694d8da780e98676d78"},
  };
  uint8_t msg[1000];
  for (size_t i = 0; i < sizeof(msg); i++) msg[i] = (uint8_t)((i * 7 + 1) % 256);
  for (size_t c = 0; c < TN_ARRAY_LEN(cases); c++) {
    char hex[65];
    hex_of(msg, cases[c].len, hex);
    ASSERT_STR_EQ(hex, cases[c].hex);
  }
}

/* Two updates split at every point give the one-update digest. */
static void test_split_updates(void) {
  uint8_t msg[200];
  for (size_t i = 0; i < sizeof(msg); i++) msg[i] = (uint8_t)(i * 31 + 5);
  char want[65], got[65];
  hex_of(msg, sizeof(msg), want);
  for (size_t cut = 0; cut <= sizeof(msg); cut++) {
    struct tn_sha256 s;
    uint8_t d[TN_SHA256_SIZE];
    tn_sha256_init(&s);
    tn_sha256_update(&s, msg, cut);
    tn_sha256_update(&s, msg + cut, 0);
    tn_sha256_update(&s, msg + cut, sizeof(msg) - cut);
    tn_sha256_final(&s, d);
    tn_sha256_hex(d, got);
    if (strcmp(got, want)) TN_FAIL_("cut at %zu: %s vs %s", cut, got, want);
  }
}

/* Both compression functions on random blocks, runs of 1 to 9 blocks
 * from unaligned addresses, give the same state; and the portable one
 * alone gives the FIPS "abc" digest (whichever the library picks). */
static void test_levels_agree(void) {
  uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t abc[64] = {'a', 'b', 'c', 0x80};
  abc[63] = 24; /* bit length */
  uint32_t h[8];
  memcpy(h, h0, sizeof(h));
  compress_portable(h, abc, 1);
  ASSERT_EQ(h[0], 0xba7816bf);
  ASSERT_EQ(h[7], 0xf20015ad);
#ifdef HAVE_SHANI
  if (!cpu_has_shani()) {
    printf("  (no SHA-NI on this CPU: only the portable level ran)\n");
    return;
  }
  memcpy(h, h0, sizeof(h));
  compress_shani(h, abc, 1);
  ASSERT_EQ(h[0], 0xba7816bf);
  ASSERT_EQ(h[7], 0xf20015ad);
  uint8_t buf[9 * 64 + 3];
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int rep = 0; rep < 200; rep++) {
    for (size_t i = 0; i < sizeof(buf); i++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64 */
      buf[i] = (uint8_t)x;
    }
    size_t n_blocks = 1 + (size_t)rep % 9, off = (size_t)rep % 4;
    uint32_t a[8], b[8];
    for (int k = 0; k < 8; k++) a[k] = b[k] = h0[k] ^ (uint32_t)(x >> k);
    compress_portable(a, buf + off, n_blocks);
    compress_shani(b, buf + off, n_blocks);
    for (int k = 0; k < 8; k++)
      if (a[k] != b[k])
        TN_FAIL_("rep %d, %zu blocks: word %d: portable %08x, SHA-NI %08x",
                 rep, n_blocks, k, a[k], b[k]);
  }
#endif
}

TN_TEST_MAIN(TN_TEST(test_fips_vectors), TN_TEST(test_million_a),
             TN_TEST(test_padding_boundaries), TN_TEST(test_split_updates),
             TN_TEST(test_levels_agree))
