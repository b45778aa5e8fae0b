/*
 * grammar.h: constrained decoding. A request may ask that its output
 * follow a grammar (a JSON schema, any JSON object, a regular expression,
 * one of a list of choices, or a grammar in tern's GBNF dialect, see
 * docs/GRAMMAR.md). All of them compile to one form, a context-free
 * grammar over bytes (tn_grammar, immutable, shared by reference), and
 * one matcher walks it:
 *
 *  - tn_grammar_vocab: one per vocabulary. The tokens' bytes in a trie
 *    (special tokens left out), and a cache of token masks keyed by
 *    (grammar, matcher state), so a state seen before (the inside of a
 *    string, the same key of the same schema in the next request) costs a
 *    lookup. Used by one thread at a time (the engine's).
 *  - tn_grammar_matcher: one per generated sequence. Its state is the set
 *    of parse stacks the output so far leaves open; the mask for the next
 *    token is every token whose bytes the state can take, found by walking
 *    the trie once with the stacks (a subtree is cut at its first byte no
 *    stack takes). End-of-generation tokens are allowed where the grammar
 *    may end.
 *
 * The grammar works on bytes, not characters: a character class is
 * compiled to the UTF-8 byte sequences of its code points, so tokens that
 * hold part of a character (byte-level BPE, byte fallback) are matched
 * exactly. Left recursion and repetition of what can be empty are refused
 * at compile time (they would not terminate); sizes are bounded
 * (TN_GRAMMAR_* below) and an input over a bound is refused by name.
 */
#ifndef TN_GRAMMAR_H
#define TN_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/base.h"

#define TN_GRAMMAR_MAX_CODE (1u << 21) /* elements after compiling */
#define TN_GRAMMAR_MAX_REPEAT 10000    /* {m,n} bounds */
#define TN_GRAMMAR_MAX_STACKS 1024     /* parse stacks open at once */
#define TN_GRAMMAR_MAX_DEPTH 4096      /* nesting of one stack */

struct tn_grammar;

/* From GBNF text (docs/GRAMMAR.md): rules `name ::= alternatives`,
 * "literals", [classes], (groups), `.`, postfix * + ? {m} {m,} {m,n},
 * comments from #. The start rule is `root`. */
enum tn_status tn_grammar_from_gbnf(const char *text, size_t len,
                                    struct tn_grammar **out,
                                    struct tn_error *err);
/* The whole output matches the regular expression (anchored at both
 * ends). */
enum tn_status tn_grammar_from_regex(const char *re, size_t len,
                                     struct tn_grammar **out,
                                     struct tn_error *err);
/* The output is exactly one of the n strings. */
enum tn_status tn_grammar_from_choices(const char *const *choices,
                                       const size_t *lens, size_t n,
                                       struct tn_grammar **out,
                                       struct tn_error *err);
/* A JSON value valid against the schema (JSON text); NULL schema: any
 * JSON object (response_format json_object). Keywords the compiler does
 * not support are refused by name, never ignored. */
enum tn_status tn_grammar_from_json_schema(const char *schema, size_t len,
                                           struct tn_grammar **out,
                                           struct tn_error *err);
/* The GBNF text a regex / schema / choice list compiled through
 * (malloc'd), for debugging and the reference tests. */
enum tn_status tn_json_schema_to_gbnf(const char *schema, size_t len,
                                      char **out, struct tn_error *err);
enum tn_status tn_regex_to_gbnf(const char *re, size_t len, char **out,
                                struct tn_error *err);

void tn_grammar_retain(struct tn_grammar *g);
void tn_grammar_release(struct tn_grammar *g); /* NULL ok */

/* ---- vocabulary and masks */

struct tn_tokenizer;
struct tn_grammar_vocab;

enum tn_status tn_grammar_vocab_new(const struct tn_tokenizer *tok,
                                    size_t cache_bytes,
                                    struct tn_grammar_vocab **out,
                                    struct tn_error *err);
void tn_grammar_vocab_free(struct tn_grammar_vocab *v);
int32_t tn_grammar_vocab_n(const struct tn_grammar_vocab *v);

struct tn_grammar_vocab_stats {
  uint64_t masks; /* computed or looked up */
  uint64_t cache_hits;
  uint64_t trie_nodes; /* visited by walks */
  double walk_seconds; /* in trie walks */
  size_t cache_bytes;  /* held now */
};
void tn_grammar_vocab_stats(const struct tn_grammar_vocab *v,
                            struct tn_grammar_vocab_stats *out);

struct tn_grammar_matcher;

enum tn_status tn_grammar_matcher_new(struct tn_grammar *g,
                                      struct tn_grammar_vocab *v,
                                      struct tn_grammar_matcher **out,
                                      struct tn_error *err);
void tn_grammar_matcher_free(struct tn_grammar_matcher *m);
/* Allowed next tokens as a bitset of tn_grammar_vocab_n() bits (bit i of
 * word i/64). Fails (err says why) when the grammar's parse blew past a
 * bound; a mask with no bit set means the state is a dead end. */
enum tn_status tn_grammar_matcher_mask(struct tn_grammar_matcher *m,
                                       uint64_t *bits, struct tn_error *err);
/* Takes a token (end-of-generation tokens: only where the grammar may
 * end). Returns false, changing nothing, when the grammar does not allow
 * it. */
bool tn_grammar_matcher_accept(struct tn_grammar_matcher *m, int32_t id);
/* Takes raw bytes (tests, forced text). */
bool tn_grammar_matcher_accept_bytes(struct tn_grammar_matcher *m,
                                     const char *b, size_t n);
/* The grammar may end here. */
bool tn_grammar_matcher_can_end(const struct tn_grammar_matcher *m);
/* It must end here: nothing more can follow. */
bool tn_grammar_matcher_done(const struct tn_grammar_matcher *m);
/* The bytes every continuation starts with (up to cap), without taking
 * them; *completes says whether after them the grammar must end. */
size_t tn_grammar_matcher_forced(const struct tn_grammar_matcher *m, char *buf,
                                 size_t cap, bool *completes);

#endif /* TN_GRAMMAR_H */
