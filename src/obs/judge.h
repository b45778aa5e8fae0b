/*
 * judge.h: an LLM judge, the parts `tern eval` and shadow deployments
 * share: the prompts, the response_format that constrains a tern judge,
 * and the robust reading of its verdicts (the whole answer as JSON, a
 * fenced block, or the last {...} in it).
 *
 * A pairwise comparison asks for {"winner": "A" | "B" | "tie"}; callers
 * run both orders, so a judge's preference for a position cancels.
 */
#ifndef TN_JUDGE_H
#define TN_JUDGE_H

#include <jansson.h>

/* The judge's system turn. */
extern const char tn_judge_system[];

/* response_format json_schema objects (new references): the verdict
 * first, then a short reason, so an answer cut by max_tokens still holds
 * the verdict. */
json_t *tn_judge_score_format(long scale);
json_t *tn_judge_winner_format(void);

/* The user turn comparing answers a and b to question (rubric may be
 * NULL). malloc'd; NULL when out of memory. */
char *tn_judge_pair_prompt(const char *question, const char *rubric,
                           const char *a, const char *b);

/* A request's question as text: "prompt" when a string, else the
 * messages as "role: content" lines (text parts of content lists).
 * malloc'd, "" when there is none; NULL when out of memory. */
char *tn_judge_question(const json_t *request);

/* text as JSON: the whole answer, or inside one ``` fence; NULL if not. */
json_t *tn_answer_json(const char *text);
/* The verdict object in a judge's answer, or NULL. */
json_t *tn_judge_verdict(const char *text);
/* 'A', 'B' or 'T' (tie); 0 when unreadable. */
char tn_judge_parse_winner(const char *text);
/* 1..scale, 0 when unreadable. */
int tn_judge_parse_score(const char *text, long scale);

#endif /* TN_JUDGE_H */
