/*
 * chat.c: `tern chat`, a multi-turn conversation in the terminal (like
 * `ollama run` and llama-cli's conversation mode).
 *
 * Each turn formats the whole history with the model's chat template and
 * submits it to the engine, whose prefix cache still holds the blocks of
 * the turns before (their prompt and the answer's generated tokens), so a
 * turn recomputes only what is new. Answers stream as they are generated.
 *
 * Input: one line is one message; a line ending in '\' continues on the
 * next; a line starting with three double quotes opens a block that ends
 * at the next line ending with them. Commands: /help, /reset (forget the
 * conversation), /system [TEXT] (show or set the system message), /bye.
 * Ctrl-C stops the answer being generated and keeps what was said; at the
 * prompt it only reminds how to leave. Ctrl-D (end of input) leaves.
 * With stdin not a terminal there is no prompt and no banner: lines are
 * read as messages, answers printed one after another (scripts, tests).
 *
 * When the conversation would leave less than a quarter of the context (or
 * -n tokens) for the answer, the oldest exchanges are dropped (the system
 * message stays) and a note says so; a message that does not fit even
 * alone is refused and the history kept. Each turn samples with the
 * session's seed plus the turn number.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli_internal.h"

struct history {
  struct tn_chat_msg *msgs; /* role is a static string; content malloc'd */
  size_t n, cap;
  char *system;             /* or NULL */
};

static void history_clear(struct history *h) {
  for (size_t i = 0; i < h->n; i++) free((char *)h->msgs[i].content);
  h->n = 0;
}

static bool history_push(struct history *h, const char *role,
                         const char *text, size_t len) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? h->cap * 2 : 16;
    struct tn_chat_msg *m = realloc(h->msgs, cap * sizeof(*m));
    if (!m) return false;
    h->msgs = m;
    h->cap = cap;
  }
  char *c = malloc(len + 1);
  if (!c) return false;
  memcpy(c, text, len);
  c[len] = '\0';
  h->msgs[h->n++] =
      (struct tn_chat_msg){.role = role, .content = c, .content_len = len};
  return true;
}

/* Drops the oldest exchange (a user message and the answer after it);
 * returns how many messages went. */
static size_t history_drop_oldest(struct history *h) {
  size_t k = h->n > 1 && !strcmp(h->msgs[1].role, "assistant") ? 2 : 1;
  for (size_t i = 0; i < k; i++) free((char *)h->msgs[i].content);
  memmove(h->msgs, h->msgs + k, (h->n - k) * sizeof(*h->msgs));
  h->n -= k;
  return k;
}

/* The last `last` messages of the conversation as the template sees them:
 * the system message first. */
static int encode(struct tn_engine *e, const struct history *h, size_t last,
                  int32_t **ids, size_t *n_ids, struct tn_error *err) {
  size_t n = last + (h->system ? 1 : 0);
  struct tn_chat_msg *all = malloc((n ? n : 1) * sizeof(*all));
  if (!all) return tn_error_set(err, TN_ENOMEM, "out of memory");
  size_t k = 0;
  if (h->system)
    all[k++] = (struct tn_chat_msg){.role = "system",
                                    .content = h->system,
                                    .content_len = strlen(h->system)};
  memcpy(all + k, h->msgs + (h->n - last), last * sizeof(*all));
  enum tn_status st = tn_engine_encode_chat(e, all, n, NULL, ids, n_ids, err);
  free(all);
  return st;
}

/* Encodes the conversation, whose last message is the new one, so that it
 * fits the context with room for an answer: the oldest exchanges go first.
 * When the system message and the new message alone do not fit, nothing
 * is dropped and the message is refused (returns 1 after saying why). */
static int fit(struct tn_engine *e, struct history *h, int32_t **ids,
               size_t *n_ids) {
  struct tn_error err = {0};
  int64_t n_ctx = tn_engine_n_ctx(e);
  enum tn_status st = encode(e, h, 1, ids, n_ids, &err);
  if (st == TN_OK && (int64_t)*n_ids >= n_ctx)
    st = tn_error_set(&err, TN_ERANGE,
                      "the message with the system message and the chat "
                      "format is %zu tokens; the context holds %" PRId64
                      " (raise it with -c)",
                      *n_ids, n_ctx);
  if (st) {
    free(*ids);
    *ids = NULL;
    return tn_cli_fail("%s", err.msg);
  }
  /* Leave room for an answer of a quarter of the context (or -n). */
  int64_t room = n_ctx / 4;
  if (tn_cli_gen.n_predict > 0 && tn_cli_gen.n_predict < room)
    room = tn_cli_gen.n_predict;
  if ((int64_t)*n_ids + room > n_ctx) room = n_ctx - (int64_t)*n_ids;
  size_t dropped = 0;
  for (;;) {
    free(*ids);
    *ids = NULL;
    st = encode(e, h, h->n, ids, n_ids, &err);
    if (st == TN_OK && (int64_t)*n_ids + room <= n_ctx) break;
    if (st != TN_OK && st != TN_ERANGE) {
      free(*ids);
      *ids = NULL;
      return tn_cli_fail("%s", err.msg);
    }
    if (h->n <= 1) break; /* cannot happen: the message alone fitted */
    dropped += history_drop_oldest(h);
  }
  if (dropped)
    fprintf(stderr, "(context full: the %zu oldest message%s dropped)\n",
            dropped, dropped == 1 ? " was" : "s were");
  return 0;
}

/* Reads one message (with continuation lines and """ blocks). Returns 1
 * with *out set, 0 at end of input, -1 when Ctrl-C interrupted the read,
 * -2 out of memory. The prompts go to stderr: stdout carries answers. */
static int read_message(bool tty, struct tn_buf *out) {
  out->len = 0;
  if (out->data) out->data[0] = '\0';
  bool block = false, first = true, started = false;
  char *line = NULL;
  size_t cap = 0;
  for (;;) {
    if (tty) fputs(first ? ">>> " : "... ", stderr);
    errno = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) {
      bool intr = errno == EINTR || tn_cli_interrupted;
      clearerr(stdin);
      free(line);
      if (intr) return -1;
      if (out->len > 0) return 1; /* a last line without newline */
      return 0;
    }
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    const char *s = line;
    size_t m = (size_t)n;
    bool ends = m >= 3 && !strcmp(s + m - 3, "\"\"\"");
    if (first && !strncmp(s, "\"\"\"", 3)) {
      block = true;
      s += 3;
      m -= 3;
      ends = m >= 3 && !strcmp(s + m - 3, "\"\"\"");
      first = false;
      if (ends) {
        tn_buf_append(out, s, m - 3);
        break;
      }
      if (m > 0) tn_buf_append(out, s, m), started = true;
      continue;
    }
    first = false;
    if (block) {
      size_t k = ends ? m - 3 : m;
      if (started && (k > 0 || !ends)) tn_buf_append(out, "\n", 1);
      tn_buf_append(out, s, k);
      started = started || k > 0 || !ends;
      if (ends) break;
      continue;
    }
    bool more = m > 0 && s[m - 1] == '\\';
    if (more) m--;
    if (started) tn_buf_append(out, "\n", 1);
    tn_buf_append(out, s, m);
    started = true;
    if (!more) break;
  }
  free(line);
  tn_buf_append(out, "", 0);
  return out->oom ? -2 : 1;
}

static void help(FILE *f) {
  fprintf(f,
          "  /help           this list\n"
          "  /reset          forget the conversation (keeps the system "
          "message)\n"
          "  /system [TEXT]  show the system message, or set it\n"
          "  /bye            leave (or Ctrl-D)\n"
          "  Ctrl-C stops an answer; end a line with \\ or wrap text in "
          "\"\"\" to write several lines\n");
}

/* Handles a /command; returns false to leave. */
static bool command(const char *line, struct history *h) {
  if (!strcmp(line, "/bye") || !strcmp(line, "/exit") ||
      !strcmp(line, "/quit"))
    return false;
  if (!strcmp(line, "/help") || !strcmp(line, "/?")) {
    help(stderr);
  } else if (!strcmp(line, "/reset") || !strcmp(line, "/clear")) {
    history_clear(h);
    fprintf(stderr, "(conversation cleared)\n");
  } else if (!strncmp(line, "/system", 7) &&
             (line[7] == '\0' || line[7] == ' ')) {
    const char *t = line + 7;
    while (*t == ' ') t++;
    if (!*t) {
      fprintf(stderr, "%s\n", h->system ? h->system : "(no system message)");
    } else {
      char *s = strdup(t);
      if (s) {
        free(h->system);
        h->system = s;
        fprintf(stderr, "(system message set)\n");
      }
    }
  } else {
    fprintf(stderr, "unknown command %s (try /help)\n", line);
  }
  return true;
}

int tn_cli_chat(int argc, char **argv) {
  tn_cli_gen_init();
  const char *system = NULL;
  const struct tn_opt chat_opts[] = {
      {"system", 0, TN_OPT_STR, &system, 0, 0, "TEXT",
       "system message for the conversation", "the template's", NULL, 0},
      {0},
  };
  const struct tn_opt_group groups[] = {
      {"chat", chat_opts},
      {"model", tn_cli_model_opts},
      {"sampling", tn_cli_sampling_opts},
      {NULL, NULL},
  };
  static const struct tn_cli_cmd cmd = {
      "chat", "tern chat -m MODEL [options]",
      "An interactive conversation with the model in the terminal. Type a "
      "message and press Enter.\n"
      "/help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves.",
      "example:\n  tern chat -m qwen2.5-coder-0.5b --system \"Answer briefly.\"",
      0};
  int rc = tn_cli_parse(&cmd, groups, argc, argv, NULL);
  if (rc) return rc;
  struct tn_engine *e = NULL;
  if (tn_cli_engine_open("chat", true, true, &e)) return 1;
  bool tty = isatty(STDIN_FILENO);
  struct history h = {0};
  if (system) h.system = strdup(system);
  struct tn_gen_params gp;
  if (tn_cli_gen_params(&gp)) {
    free(h.system);
    tn_engine_close(e);
    return 1;
  }
  tn_cli_catch_sigint();
  if (tty)
    fprintf(stderr, "tern chat: %s (context %d tokens). /help for commands, "
                    "Ctrl-D to leave.\n",
            tn_cli_gen.model, tn_engine_n_ctx(e));
  struct tn_buf in = {0};
  uint64_t turn = 0;
  rc = 0;
  for (;;) {
    tn_cli_interrupted = 0;
    int got = read_message(tty, &in);
    if (got == 0) break;
    if (got == -2) {
      rc = tn_cli_fail("out of memory reading the message");
      break;
    }
    if (got < 0) {
      fprintf(stderr, "\n(Ctrl-D or /bye to leave)\n");
      continue;
    }
    const char *msg = in.data;
    size_t len = in.len;
    while (len > 0 && (*msg == ' ' || *msg == '\t')) msg++, len--;
    if (len == 0) continue;
    if (msg[0] == '/' && !memchr(msg, '\n', len)) {
      if (!command(msg, &h)) break;
      continue;
    }
    if (!history_push(&h, "user", msg, len)) {
      rc = tn_cli_fail("out of memory");
      break;
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (fit(e, &h, &ids, &n_ids)) {
      free((char *)h.msgs[--h.n].content); /* refused: history unchanged */
      if (!tty) {
        rc = 1;
        break;
      }
      continue;
    }
    /* A new seed each turn (from the drawn or given one), so asking again
     * does not repeat the answer; the session stays repeatable. */
    gp.sampling.seed = (uint64_t)tn_cli_gen.seed + turn++;
    struct tn_cli_stream_result res = {0};
    int src = tn_cli_stream(e, ids, n_ids, &gp, stdout, &res);
    free(ids);
    fputc('\n', stdout);
    fflush(stdout);
    if (res.finish == TN_FINISH_CANCELLED) fprintf(stderr, "(stopped)\n");
    if (tn_cli_gen.verbose) tn_cli_print_timings(&res);
    bool ok = src == 0 && !res.text.oom &&
              history_push(&h, "assistant", res.text.data ? res.text.data : "",
                           res.text.len);
    tn_buf_free(&res.text);
    if (!ok) {
      free((char *)h.msgs[--h.n].content); /* the unanswered message */
      if (!tty) {
        rc = 1;
        break;
      }
    }
  }
  if (tty) fputc('\n', stderr);
  tn_buf_free(&in);
  history_clear(&h);
  free(h.msgs);
  free(h.system);
  tn_engine_close(e);
  tn_cli_gen_done();
  return rc;
}
