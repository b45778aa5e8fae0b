/*
 * opts.c: one option parser for every subcommand.
 *
 * Each command declares its options as tables (struct tn_opt, grouped
 * under headings); the same tables give the parser, the range checks with
 * their error messages, and `--help` with the defaults read from the
 * destination variables before parsing. So every command accepts -h/--help,
 * every error has one form ("tern: error: -t/--threads: ..."), and a flag
 * cannot exist without its help line.
 *
 * Accepted spellings: -t 4, -t4, --threads 4, --threads=4; a flag never
 * takes a value; "--" ends the options. A numeric short option followed by
 * letters (llama.cpp's -ngl 99) is an unknown option, not "-n" with the
 * value "gl"; a text option takes what follows it (-fa is -f a, whose
 * file then does not exist).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "server/config.h"

/* "-t/--threads", "--temp" or "-p" for messages. */
static const char *opt_label(const struct tn_opt *o, char *buf, size_t cap) {
  if (o->short_name && o->name)
    snprintf(buf, cap, "-%c/--%s", o->short_name, o->name);
  else if (o->name)
    snprintf(buf, cap, "--%s", o->name);
  else
    snprintf(buf, cap, "-%c", o->short_name);
  return buf;
}

static bool takes_value(const struct tn_opt *o) {
  return o->kind != TN_OPT_FLAG && o->kind != TN_OPT_HELP;
}

/* Stores value s into o's destination, or prints why not. */
static bool opt_set(const struct tn_opt *o, const char *s) {
  char lab[80];
  opt_label(o, lab, sizeof(lab));
  switch (o->kind) {
  case TN_OPT_END:
  case TN_OPT_COUNT: return false;
  case TN_OPT_FLAG: *(bool *)o->dst = true; return true;
  case TN_OPT_HELP: return true;
  case TN_OPT_INT: {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < (long)o->lo || v > (long)o->hi) {
      tn_cli_fail("%s: '%s' is not an integer in [%ld, %ld]", lab, s,
                  (long)o->lo, (long)o->hi);
      return false;
    }
    *(long *)o->dst = v;
    return true;
  }
  case TN_OPT_FLOAT: {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < o->lo || v > o->hi) {
      tn_cli_fail("%s: '%s' is not a number in [%g, %g]", lab, s, o->lo,
                  o->hi);
      return false;
    }
    *(float *)o->dst = (float)v;
    return true;
  }
  case TN_OPT_STR:
    if (!*s && !(o->flags & TN_OPT_EMPTY_OK)) {
      tn_cli_fail("%s: the value is empty", lab);
      return false;
    }
    *(const char **)o->dst = s;
    return true;
  case TN_OPT_SIZE: {
    struct tn_error err = {0};
    int64_t v;
    if (tn_parse_size(s, &v, &err)) {
      tn_cli_fail("%s: %s", lab, err.msg);
      return false;
    }
    *(int64_t *)o->dst = v;
    return true;
  }
  case TN_OPT_LIST: {
    struct tn_cli_list *l = o->dst;
    int max = o->hi >= 1 && o->hi < TN_CLI_LIST_MAX ? (int)o->hi
                                                     : TN_CLI_LIST_MAX;
    if (l->n == max) {
      tn_cli_fail("%s: at most %d values", lab, max);
      return false;
    }
    l->v[l->n++] = s;
    return true;
  }
  }
  return false;
}

static const struct tn_opt *find_long(const struct tn_opt_group *groups,
                                      const char *name, size_t len) {
  for (const struct tn_opt_group *g = groups; g->opts; g++)
    for (const struct tn_opt *o = g->opts; o->kind || o->name; o++)
      if (o->name && strlen(o->name) == len && !strncmp(o->name, name, len))
        return o;
  return NULL;
}

static const struct tn_opt *find_short(const struct tn_opt_group *groups,
                                       char c) {
  for (const struct tn_opt_group *g = groups; g->opts; g++)
    for (const struct tn_opt *o = g->opts; o->kind || o->name; o++)
      if (o->short_name == c) return o;
  return NULL;
}

/* The default shown in --help, from the destination before parsing. */
static void default_text(const struct tn_opt *o, char *buf, size_t cap) {
  buf[0] = '\0';
  if (o->def) {
    snprintf(buf, cap, "%s", o->def);
    return;
  }
  if (!o->dst) return;
  switch (o->kind) {
  case TN_OPT_INT: snprintf(buf, cap, "%ld", *(long *)o->dst); break;
  case TN_OPT_FLOAT: snprintf(buf, cap, "%g", (double)*(float *)o->dst); break;
  case TN_OPT_STR:
    if (*(const char **)o->dst) snprintf(buf, cap, "%s", *(const char **)o->dst);
    break;
  default: break;
  }
}

/* Prints text from column col (the cursor is there), breaking lines at
 * spaces before column width; continuation lines are indented to col. */
static void put_line(FILE *f, const char *p, int n) {
  for (int i = 0; i < n; i++) fputc(p[i] == '\x1f' ? ' ' : p[i], f);
}

static void wrap(FILE *f, const char *text, int col, int width) {
  const char *p = text;
  int room = width - col;
  while (*p) {
    int n = (int)strlen(p);
    if (n <= room) {
      put_line(f, p, n);
      fputc('\n', f);
      return;
    }
    int cut = room;
    while (cut > 0 && p[cut] != ' ') cut--;
    if (cut == 0) { /* one long word */
      cut = room;
      while (p[cut] && p[cut] != ' ') cut++;
    }
    put_line(f, p, cut);
    if (!p[cut]) {
      fputc('\n', f);
      return;
    }
    fprintf(f, "\n%*s", col, "");
    p += cut;
    while (*p == ' ') p++;
  }
}

/* defs: the default texts, one per option in table order, or NULL to
 * read them from the destinations now. */
static void help(FILE *f, const struct tn_cli_cmd *cmd,
                 const struct tn_opt_group *groups, char (*defs)[160]) {
  int k = 0;
  fprintf(f, "usage: %s\n", cmd->usage);
  if (cmd->about) fprintf(f, "\n%s\n", cmd->about);
  for (const struct tn_opt_group *g = groups; g->opts; g++) {
    fprintf(f, "\n%s:\n", g->title ? g->title : "options");
    for (const struct tn_opt *o = g->opts; o->kind || o->name; o++) {
      char left[96], def[160];
      size_t n = 0;
      n += (size_t)snprintf(left + n, sizeof(left) - n, "  ");
      if (o->short_name)
        n += (size_t)snprintf(left + n, sizeof(left) - n, "-%c%s",
                              o->short_name, o->name ? ", " : "");
      else
        n += (size_t)snprintf(left + n, sizeof(left) - n, "    ");
      if (o->name)
        n += (size_t)snprintf(left + n, sizeof(left) - n, "--%s", o->name);
      if (takes_value(o))
        snprintf(left + n, sizeof(left) - n, " %s",
                 o->metavar ? o->metavar : "VALUE");
      if (defs)
        snprintf(def, sizeof(def), "%s", defs[k]);
      else
        default_text(o, def, sizeof(def));
      k++;
      char text[512];
      /* "(default: X)" stays on one line: its spaces are unit separators
       * until printed */
      for (char *d = def; *d; d++)
        if (*d == ' ') *d = '\x1f';
      snprintf(text, sizeof(text), "%s%s%s%s", o->help ? o->help : "",
               def[0] ? " (default:\x1f" : "", def, def[0] ? ")" : "");
      if (strlen(left) > 27)
        fprintf(f, "%s\n%28s", left, "");
      else
        fprintf(f, "%-28s", left);
      wrap(f, text, 28, 79);
    }
  }
  if (cmd->epilog) fprintf(f, "\n%s\n", cmd->epilog);
}

void tn_cli_help(FILE *f, const struct tn_cli_cmd *cmd,
                 const struct tn_opt_group *groups) {
  help(f, cmd, groups, NULL);
}

/* The defaults as they are before parsing (--help after other options
 * must not show the values given). malloc'd, one per option. */
static char (*snapshot_defaults(const struct tn_opt_group *groups))[160] {
  int n = 0;
  for (const struct tn_opt_group *g = groups; g->opts; g++)
    for (const struct tn_opt *o = g->opts; o->kind || o->name; o++) n++;
  char(*defs)[160] = calloc((size_t)(n ? n : 1), sizeof(*defs));
  if (!defs) return NULL;
  int k = 0;
  for (const struct tn_opt_group *g = groups; g->opts; g++)
    for (const struct tn_opt *o = g->opts; o->kind || o->name; o++)
      default_text(o, defs[k++], sizeof(defs[0]));
  return defs;
}

static int parse(const struct tn_cli_cmd *cmd,
                 const struct tn_opt_group *groups, int argc, char **argv,
                 struct tn_cli_list *positional, char (*defs)[160]) {
  if (positional) positional->n = 0;
  bool only_positional = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const struct tn_opt *o = NULL;
    const char *val = NULL;
    bool val_attached = false;
    if (only_positional || a[0] != '-' || !a[1] ||
        (a[1] != '-' && (a[1] == '.' || (a[1] >= '0' && a[1] <= '9')))) {
      /* A positional argument ("-" alone is one: stdin). */
      if (!positional || positional->n == cmd->max_positional ||
          positional->n == TN_CLI_LIST_MAX) {
        if (cmd->max_positional == 0)
          return tn_cli_fail("%s: unexpected argument '%s'%s", cmd->name, a,
                             i > 1 && find_short(groups, 'p')
                                 ? " (quote values with spaces: -p \"two "
                                   "words\")"
                                 : "");
        return tn_cli_fail("%s: unexpected argument '%s' (at most %d)",
                           cmd->name, a, cmd->max_positional);
      }
      positional->v[positional->n++] = a;
      continue;
    }
    if (a[1] == '-') {
      if (!a[2]) {
        only_positional = true;
        continue;
      }
      const char *name = a + 2;
      const char *eq = strchr(name, '=');
      size_t len = eq ? (size_t)(eq - name) : strlen(name);
      o = find_long(groups, name, len);
      if (!o)
        return tn_cli_fail("%s: unknown option '--%.*s' (see 'tern %s "
                           "--help')",
                           cmd->name, (int)len, name, cmd->name);
      if (eq) {
        if (!takes_value(o))
          return tn_cli_fail("%s: --%s takes no value", cmd->name, o->name);
        val = eq + 1;
        val_attached = true;
      }
    } else {
      o = find_short(groups, a[1]);
      if (!o)
        return tn_cli_fail("%s: unknown option '%s' (see 'tern %s --help')",
                           cmd->name, a, cmd->name);
      if (a[2]) {
        /* "-n64" is -n 64; "-ngl" or "-vv" are not options of ours. */
        if (!takes_value(o) || ((o->kind == TN_OPT_INT ||
                                 o->kind == TN_OPT_FLOAT) &&
                                !(a[2] == '-' || a[2] == '.' ||
                                  (a[2] >= '0' && a[2] <= '9'))))
          return tn_cli_fail("%s: unknown option '%s' (see 'tern %s "
                             "--help')",
                             cmd->name, a, cmd->name);
        val = a + 2;
        val_attached = true;
      }
    }
    if (o->kind == TN_OPT_HELP) {
      help(stdout, cmd, groups, defs);
      return -1;
    }
    if (takes_value(o) && !val_attached) {
      if (i + 1 >= argc) {
        char lab[80];
        return tn_cli_fail("%s: %s needs a value (%s)", cmd->name,
                           opt_label(o, lab, sizeof(lab)),
                           o->metavar ? o->metavar : "VALUE");
      }
      val = argv[++i];
    }
    if (!opt_set(o, val)) return 1;
    if (o->seen) *o->seen = true;
  }
  return 0;
}

int tn_cli_parse(const struct tn_cli_cmd *cmd,
                 const struct tn_opt_group *groups, int argc, char **argv,
                 struct tn_cli_list *positional) {
  char(*defs)[160] = snapshot_defaults(groups);
  int rc = parse(cmd, groups, argc, argv, positional, defs);
  free(defs);
  return rc;
}
