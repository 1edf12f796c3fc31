/* The Qwen3 decoder block as a table of stages (block.c): the single truth of the model's
 * wiring. Forward runs the table in order, backward in reverse. */
#ifndef QWEN3_BLOCK_H
#define QWEN3_BLOCK_H

#include "worker/worker.h"

enum op { OP_RMSNORM, OP_LINEAR, OP_QK_NORM_ROPE, OP_ATTENTION, OP_ADD, OP_SWIGLU };

struct stage {
  const char *name;
  enum op op;
  enum slot in[3];
  enum slot out[3];
  enum layer_param params[3];
  int n_params;
};

extern const struct stage QWEN3_BLOCK[];
extern const int QWEN3_BLOCK_STAGES;

/* Values per token of a slot. */
size_t slot_width(const struct qwen3_config *c, enum slot s);
/* A slot's storage: the log-sum-exp is fp32 (the softmax statistics), every other slot and
 * every gradient slot is of the activation dtype p->act. */
enum dtype slot_dtype(const struct worker_plan *p, enum slot s);
/* 1 when some stage's backward reads the slot (derived from the table and each op's backward),
 * so it must be kept from forward to backward; 0 for a slot only the next stage reads (the
 * outputs of o_proj and down_proj, read by the residual adds, whose backward reads nothing). */
int slot_needed_by_backward(enum slot s);

/* 1 when the plan rebuilds slot s in backward (from the slots its producing stage reads,
 * which are kept) instead of keeping it from the forward: the norm outputs and the SwiGLU
 * product, by plan.recompute's RECOMPUTE_NORMS and RECOMPUTE_SWIGLU. */
int slot_recomputed(const struct worker_plan *p, enum slot s);

/* Forward of local layer `layer` for live micro-batch `live`: reads S_X, writes every slot. */
void block_forward(struct worker *w, int live, int layer);
/* Backward: dy is the gradient of S_Y; dx (overwritten) receives the gradient of S_X. */
void block_backward(struct worker *w, int live, int layer, const void *dy, void *dx);

/* --timing: seconds spent in each stage per phase, when enabled. Prefill is a generation
 * forward with no cached tokens (and every no-KV replay), decode one with cached tokens. */
enum phase { PHASE_FORWARD, PHASE_BACKWARD, PHASE_PREFILL, PHASE_DECODE, N_PHASES };
extern int block_timing;
extern double block_stage_seconds[][N_PHASES];

#endif
