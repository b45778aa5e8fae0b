/*
 * upstream.c: calls to remote OpenAI-compatible servers (router.h).
 *
 * One thread drives a libcurl multi handle. Owners (HTTP threads) hand it
 * calls through a small queue and curl_multi_wakeup(); the thread adds
 * them, runs the transfers, and appends each call's answer to its buffer,
 * calling notify so the owner resumes its connection. Every curl call on a
 * transfer happens on this thread (libcurl wants that for a multi handle),
 * so cancelling and un-pausing are requests in the same queue. Finished
 * easy handles leave their connections in the multi handle's cache, which
 * is what makes the next call to the same upstream reuse one.
 *
 * A call is shared by its owner and the thread (refs); the last to let go
 * frees it. notify runs under the call's lock and release takes that lock,
 * so no notify runs after release returns.
 */
#include "router/router.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct tn_upstream_call {
  struct tn_upstream_pool *pool;
  pthread_mutex_t mu;
  atomic_int refs;               /* owner + pool thread */
  CURL *easy;
  struct curl_slist *hdrs;
  char *url, *body, *auth;
  size_t len;
  struct tn_upstream_spec spec;  /* strings above replace its pointers */
  char errbuf[CURL_ERROR_SIZE];

  /* under mu */
  struct tn_buf buf;
  size_t received;               /* body bytes so far */
  double last_byte;              /* tn_time_s() of the last byte (or the
                                    start): the stall clock */
  struct tn_upstream_state st;
  bool paused, want_unpause, cancel, released;

  /* under the pool's mu */
  bool queued;
  struct tn_upstream_call *next;

  /* the pool thread's own */
  bool in_multi, finished;
  struct tn_upstream_call *act_prev, *act_next; /* the active list */
};

struct tn_upstream_pool {
  CURLM *multi;
  pthread_t thread;
  pthread_mutex_t mu;
  struct tn_upstream_call *queue; /* calls with something to do */
  bool closed;                     /* under mu: no more queueing */
  atomic_bool stop;
  struct tn_upstream_call *active; /* in the multi handle (thread's own) */
};

static pthread_once_t g_curl_once = PTHREAD_ONCE_INIT;
static CURLcode g_curl_init;
static void curl_init_once(void) {
  g_curl_init = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void call_unref(struct tn_upstream_call *c) {
  if (atomic_fetch_sub(&c->refs, 1) != 1) return;
  pthread_mutex_destroy(&c->mu);
  curl_slist_free_all(c->hdrs);
  tn_buf_free(&c->buf);
  free(c->url);
  free(c->body);
  free(c->auth);
  free(c);
}

/* Queues c for the thread (new, cancel, unpause). False once the pool
 * is stopping: its thread may have made its last pass. */
static bool enqueue(struct tn_upstream_pool *p, struct tn_upstream_call *c) {
  pthread_mutex_lock(&p->mu);
  if (p->closed) {
    pthread_mutex_unlock(&p->mu);
    return false;
  }
  if (!c->queued) {
    c->queued = true;
    c->next = p->queue;
    p->queue = c;
    atomic_fetch_add(&c->refs, 1);
  }
  pthread_mutex_unlock(&p->mu);
  curl_multi_wakeup(p->multi);
  return true;
}

/* under c->mu */
static void wake_owner(struct tn_upstream_call *c) {
  if (!c->released && c->spec.notify) c->spec.notify(c->spec.user);
}

static size_t on_header(char *data, size_t size, size_t n, void *user) {
  struct tn_upstream_call *c = user;
  size_t len = size * n;
  pthread_mutex_lock(&c->mu);
  c->last_byte = tn_time_s();
  if (len <= 2 && (data[0] == '\r' || data[0] == '\n')) {
    long code = 0;
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &code);
    if (code >= 200) { /* not a 1xx interim block */
      c->st.http_status = (int)code;
      c->st.headers_done = true;
      wake_owner(c);
    }
  } else if (len > 13 && !strncasecmp(data, "content-type:", 13)) {
    const char *v = data + 13;
    size_t k = len - 13;
    while (k && (*v == ' ' || *v == '\t')) v++, k--;
    while (k && (v[k - 1] == '\r' || v[k - 1] == '\n' || v[k - 1] == ' ')) k--;
    snprintf(c->st.content_type, sizeof c->st.content_type, "%.*s", (int)k, v);
  } else if (len > 12 && !strncasecmp(data, "retry-after:", 12)) {
    char v[24];
    snprintf(v, sizeof v, "%.*s", (int)TN_MIN(len - 12, sizeof v - 1),
             data + 12);
    long secs = strtol(v, NULL, 10);
    c->st.retry_after = secs > 0 && secs < 86400 ? (int)secs : 0;
  } else if (len > 5 && !strncasecmp(data, "HTTP/", 5)) {
    /* a new header block (after a 1xx): its own fields */
    c->st.content_type[0] = '\0';
    c->st.retry_after = 0;
  }
  pthread_mutex_unlock(&c->mu);
  return len;
}

static size_t on_body(char *data, size_t size, size_t n, void *user) {
  struct tn_upstream_call *c = user;
  size_t len = size * n;
  size_t ret = len;
  pthread_mutex_lock(&c->mu);
  c->last_byte = tn_time_s();
  if (c->cancel) {
    ret = 0; /* aborts the transfer */
  } else if (!c->spec.stream && c->received + len > c->spec.max_buffered) {
    snprintf(c->st.error, sizeof c->st.error,
             "the upstream's answer is larger than %zu bytes",
             c->spec.max_buffered);
    c->st.failed = true;
    ret = 0;
  } else if (c->buf.len + len > c->spec.max_buffered) {
    if (c->spec.stream && c->buf.len > 0) {
      c->paused = true; /* resumes when the owner has taken the bytes */
      ret = CURL_WRITEFUNC_PAUSE;
    } else {
      snprintf(c->st.error, sizeof c->st.error,
               "the upstream's answer is larger than %zu bytes",
               c->spec.max_buffered);
      c->st.failed = true;
      ret = 0;
    }
  } else {
    c->received += len;
    tn_buf_append(&c->buf, data, len);
    if (c->buf.oom) {
      snprintf(c->st.error, sizeof c->st.error, "out of memory");
      c->st.failed = true;
      ret = 0;
    } else {
      wake_owner(c);
    }
  }
  pthread_mutex_unlock(&c->mu);
  return ret;
}

static bool call_setup(struct tn_upstream_call *c) {
  CURL *h = c->easy = curl_easy_init();
  if (!h) return false;
  const char *want[4] = {"Content-Type: application/json", "Expect:",
                         c->spec.stream ? "Accept: text/event-stream" : NULL,
                         c->auth};
  for (int i = 0; i < 4; i++) {
    if (!want[i]) continue;
    struct curl_slist *l = curl_slist_append(c->hdrs, want[i]);
    if (!l) return false; /* c->hdrs is freed with the call */
    c->hdrs = l;
  }
  curl_easy_setopt(h, CURLOPT_URL, c->url);
  curl_easy_setopt(h, CURLOPT_PRIVATE, c);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_POST, 1L);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, c->body);
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->len);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->hdrs);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, c);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, c);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
                   (long)(c->spec.connect_timeout_s * 1000));
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(c->spec.timeout_s * 1000));
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
  curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
  /* the answer as the upstream sent it: no transparent decoding */
  curl_easy_setopt(h, CURLOPT_HTTP_CONTENT_DECODING, 0L);
  return true;
}

/* The transfer ended (res), or never started; tells the owner. */
static void call_finish(struct tn_upstream_pool *p, struct tn_upstream_call *c,
                        CURLcode res, const char *why) {
  if (c->finished) return;
  c->finished = true;
  if (c->in_multi) {
    curl_multi_remove_handle(p->multi, c->easy);
    c->in_multi = false;
    if (c->act_prev) c->act_prev->act_next = c->act_next;
    else p->active = c->act_next;
    if (c->act_next) c->act_next->act_prev = c->act_prev;
  }
  pthread_mutex_lock(&c->mu);
  if (why) {
    if (!c->st.failed)
      snprintf(c->st.error, sizeof c->st.error, "%s", why);
    c->st.failed = true;
  } else if (res != CURLE_OK) {
    if (!c->st.failed)
      snprintf(c->st.error, sizeof c->st.error, "%.80s%s%.160s",
               curl_easy_strerror(res), c->errbuf[0] ? ": " : "", c->errbuf);
    c->st.failed = true;
    c->st.connect_failed = res == CURLE_COULDNT_CONNECT ||
                           res == CURLE_COULDNT_RESOLVE_HOST ||
                           res == CURLE_COULDNT_RESOLVE_PROXY;
    c->st.timed_out = res == CURLE_OPERATION_TIMEDOUT;
  } else if (!c->st.headers_done) {
    c->st.failed = true;
    snprintf(c->st.error, sizeof c->st.error, "the upstream sent no answer");
  }
  c->st.done = true;
  c->paused = c->want_unpause = false; /* nothing to resume any more */
  wake_owner(c);
  pthread_mutex_unlock(&c->mu);
  if (c->easy) {
    curl_easy_cleanup(c->easy);
    c->easy = NULL;
  }
  call_unref(c); /* the thread's reference */
}

/* Handles every queued call. One at a time off the queue, under its lock:
 * once a call is off it (queued false) an owner may queue it again, which
 * rewrites its link, so no detached list is walked. */
static void run_queue(struct tn_upstream_pool *p) {
  for (;;) {
    pthread_mutex_lock(&p->mu);
    struct tn_upstream_call *c = p->queue;
    if (c) {
      p->queue = c->next;
      c->next = NULL;
      c->queued = false;
    }
    pthread_mutex_unlock(&p->mu);
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    bool cancel = c->cancel, unpause = c->want_unpause && c->paused;
    if (unpause) c->paused = c->want_unpause = false;
    pthread_mutex_unlock(&c->mu);
    if (!c->finished) {
      if (cancel || atomic_load(&p->stop)) {
        call_finish(p, c, CURLE_ABORTED_BY_CALLBACK,
                    cancel ? "canceled" : "the server is stopping");
      } else if (!c->in_multi && !c->easy) {
        if (!call_setup(c) || curl_multi_add_handle(p->multi, c->easy))
          call_finish(p, c, CURLE_OUT_OF_MEMORY, "could not start the call");
        else {
          pthread_mutex_lock(&c->mu);
          c->last_byte = tn_time_s();
          pthread_mutex_unlock(&c->mu);
          c->in_multi = true;
          c->act_prev = NULL;
          c->act_next = p->active;
          if (p->active) p->active->act_prev = c;
          p->active = c;
        }
      } else if (unpause && c->easy) {
        curl_easy_pause(c->easy, CURLPAUSE_CONT);
      }
    }
    call_unref(c); /* the queue's reference */
  }
}

/* Ends calls that received nothing for their stall_timeout_s (a transfer
 * paused for a slow client is not stalled). libcurl's low-speed limit
 * averages over seconds and counts the upload, so it fires late; this
 * clock is the last byte's. */
static void check_stalls(struct tn_upstream_pool *p) {
  double now = tn_time_s();
  for (struct tn_upstream_call *c = p->active, *next; c; c = next) {
    next = c->act_next;
    pthread_mutex_lock(&c->mu);
    bool stalled = !c->paused && now - c->last_byte > c->spec.stall_timeout_s;
    if (stalled) {
      snprintf(c->st.error, sizeof c->st.error,
               "no byte from the upstream for %.3g s (stall_timeout_s)",
               c->spec.stall_timeout_s);
      c->st.failed = true;
      c->st.timed_out = true;
    }
    pthread_mutex_unlock(&c->mu);
    if (stalled) call_finish(p, c, CURLE_OPERATION_TIMEDOUT, NULL);
  }
}

static void *pool_main(void *arg) {
  struct tn_upstream_pool *p = arg;
  while (!atomic_load(&p->stop)) {
    run_queue(p);
    int running = 0;
    curl_multi_perform(p->multi, &running);
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(p->multi, &left))) {
      if (m->msg != CURLMSG_DONE) continue;
      struct tn_upstream_call *c = NULL;
      curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&c);
      if (c) call_finish(p, c, m->data.result, NULL);
    }
    check_stalls(p);
    curl_multi_poll(p->multi, NULL, 0, 100, NULL);
  }
  /* stopping: no call is queued after this; every call still queued or
   * running ends now */
  pthread_mutex_lock(&p->mu);
  p->closed = true;
  pthread_mutex_unlock(&p->mu);
  run_queue(p);
  while (p->active)
    call_finish(p, p->active, CURLE_ABORTED_BY_CALLBACK,
                "the server is stopping");
  return NULL;
}

enum tn_status tn_upstream_pool_start(struct tn_upstream_pool **out,
                                      struct tn_error *err) {
  pthread_once(&g_curl_once, curl_init_once);
  if (g_curl_init != CURLE_OK)
    return tn_error_set(err, TN_EIO, "libcurl did not initialise: %s",
                        curl_easy_strerror(g_curl_init));
  struct tn_upstream_pool *p = calloc(1, sizeof *p);
  if (!p) return tn_error_set(err, TN_ENOMEM, "out of memory");
  p->multi = curl_multi_init();
  if (!p->multi) {
    free(p);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  pthread_mutex_init(&p->mu, NULL);
  if (tn_thread_create(&p->thread, pool_main, p)) {
    curl_multi_cleanup(p->multi);
    pthread_mutex_destroy(&p->mu);
    free(p);
    return tn_error_set(err, TN_EIO, "could not start the upstream thread");
  }
  *out = p;
  return TN_OK;
}

void tn_upstream_pool_stop(struct tn_upstream_pool *p) {
  if (!p) return;
  atomic_store(&p->stop, true);
  curl_multi_wakeup(p->multi);
  pthread_join(p->thread, NULL);
  curl_multi_cleanup(p->multi);
  pthread_mutex_destroy(&p->mu);
  free(p);
}

enum tn_status tn_upstream_call_start(struct tn_upstream_pool *p,
                                      const struct tn_upstream_spec *spec,
                                      struct tn_upstream_call **out,
                                      struct tn_error *err) {
  struct tn_upstream_call *c = calloc(1, sizeof *c);
  if (!c) return tn_error_set(err, TN_ENOMEM, "out of memory");
  pthread_mutex_init(&c->mu, NULL);
  atomic_init(&c->refs, 2); /* owner, thread */
  c->pool = p;
  c->spec = *spec;
  c->url = strdup(spec->url);
  c->body = malloc(spec->len + 1);
  if (spec->api_key) {
    size_t n = strlen(spec->api_key) + 32;
    if ((c->auth = malloc(n)))
      snprintf(c->auth, n, "Authorization: Bearer %s", spec->api_key);
  }
  if (!c->url || !c->body || (spec->api_key && !c->auth)) {
    atomic_store(&c->refs, 1);
    call_unref(c);
    return tn_error_set(err, TN_ENOMEM, "out of memory");
  }
  memcpy(c->body, spec->body, spec->len);
  c->body[spec->len] = '\0';
  c->len = spec->len;
  c->spec.url = c->url;
  c->spec.body = c->body;
  c->spec.api_key = NULL;
  if (c->spec.max_buffered == 0) c->spec.max_buffered = 1u << 20;
  if (!enqueue(p, c)) {
    atomic_store(&c->refs, 1);
    call_unref(c);
    return tn_error_set(err, TN_ECANCELED, "the server is stopping");
  }
  *out = c;
  return TN_OK;
}

void tn_upstream_call_take(struct tn_upstream_call *c,
                           struct tn_upstream_state *st, struct tn_buf *out) {
  pthread_mutex_lock(&c->mu);
  *st = c->st;
  bool unpause = false;
  if (out && c->buf.len) {
    tn_buf_append(out, c->buf.data, c->buf.len);
    c->buf.len = 0;
    if (c->paused && !c->want_unpause) unpause = c->want_unpause = true;
  }
  pthread_mutex_unlock(&c->mu);
  if (unpause) (void)enqueue(c->pool, c); /* stopping: ends anyway */
}

void tn_upstream_call_release(struct tn_upstream_call *c) {
  if (!c) return;
  pthread_mutex_lock(&c->mu);
  c->released = true;
  bool running = !c->st.done;
  if (running) c->cancel = true;
  pthread_mutex_unlock(&c->mu);
  if (running) (void)enqueue(c->pool, c); /* stopping: ends anyway */
  call_unref(c);
}
