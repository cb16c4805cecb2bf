/*
 * kvc_cuda.h - the CUDA backend of the core, callable from C.
 *
 * One launcher per CPU op, taking the op's own params struct (score.h,
 * select.h, ...) with every view and pointer on one CUDA device, and the
 * caller's stream as a void * (a cudaStream_t; NULL is the legacy default
 * stream). Launchers
 *   - never allocate: ops that need scratch read it from p->scratch, a
 *     device buffer of at least kvc_cuda_<op>_workspace(p) bytes (which
 *     reads shapes only, never device memory);
 *   - ignore p->num_threads;
 *   - return KVC_ERR_CUDA when a launch fails, KVC_ERR_UNSUPPORTED for a
 *     shape the kernels do not cover, KVC_ERR_NOMEM for short scratch;
 *   - do not synchronise, except select_topk, head_budgets and pack, which
 *     must report KVC_ERR_NAN and so wait for a flag on their stream.
 * The caller has made the tensors' device current (kvc_cuda_set_device).
 *
 * Plain C declarations only, so the module files (gcc) include this header
 * without the CUDA toolkit; compiled into the extension when KVC_WITH_CUDA.
 */
#ifndef KVC_CUDA_H
#define KVC_CUDA_H

#include <stddef.h>

#include "../attention.h"
#include "../attention_packed.h"
#include "../budget.h"
#include "../compact.h"
#include "../keyformer.h"
#include "../kvc.h"
#include "../lagkv.h"
#include "../lsh.h"
#include "../merge.h"
#include "../minicache.h"
#include "../pages.h"
#include "../quant.h"
#include "../score.h"
#include "../score_global.h"
#include "../select.h"
#include "../span.h"
#include "../kvcrush.h"
#include "../kvmerger.h"
#include "../actqkv.h"
#include "../layerbudget.h"
#include "../fastgen.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- runtime (runtime.cu): the only CUDA runtime calls the module makes ---- */

/* Number of visible devices (0 when the driver is missing). */
int kvc_cuda_device_count(void);
/* Make `device` current; *previous (may be NULL) gets the old one. */
enum kvc_status kvc_cuda_set_device(int device, int *previous);
/* Stream-ordered device scratch (cudaMallocAsync / cudaFreeAsync). */
enum kvc_status kvc_cuda_scratch_alloc(void **ptr, size_t bytes, void *stream);
void kvc_cuda_scratch_free(void *ptr, void *stream);
/* Copy bytes device -> host ordered on `stream`, then wait for it. */
enum kvc_status kvc_cuda_copy_to_host(void *dst, const void *src, size_t bytes, void *stream);
enum kvc_status kvc_cuda_stream_sync(void *stream);
/* Text of the last CUDA error seen by this thread (cleared by the call). */
const char *kvc_cuda_last_error(void);

/* ---- ops ---- */

size_t kvc_cuda_window_scores_workspace(const struct kvc_window_scores_params *p);
enum kvc_status kvc_cuda_window_scores(const struct kvc_window_scores_params *p, void *stream);
enum kvc_status kvc_cuda_vector_norm(const struct kvc_vector_norm_params *p, void *stream);
enum kvc_status kvc_cuda_pool1d(const struct kvc_pool1d_params *p, void *stream);

size_t kvc_cuda_keyformer_scores_workspace(const struct kvc_keyformer_scores_params *p);
enum kvc_status kvc_cuda_keyformer_scores(const struct kvc_keyformer_scores_params *p, void *stream);
size_t kvc_cuda_lagkv_scores_workspace(const struct kvc_lagkv_scores_params *p);
enum kvc_status kvc_cuda_lagkv_scores(const struct kvc_lagkv_scores_params *p, void *stream);

size_t kvc_cuda_global_scores_workspace(const struct kvc_global_scores_params *p);
enum kvc_status kvc_cuda_global_scores(const struct kvc_global_scores_params *p, void *stream);

size_t kvc_cuda_select_topk_workspace(const struct kvc_select_topk_params *p);
enum kvc_status kvc_cuda_select_topk(const struct kvc_select_topk_params *p, void *stream);

enum kvc_status kvc_cuda_gather(const struct kvc_gather_params *p, void *stream);
enum kvc_status kvc_cuda_page_bounds(const struct kvc_page_bounds_params *p, void *stream);
enum kvc_status kvc_cuda_page_scores(const struct kvc_page_scores_params *p, void *stream);
enum kvc_status kvc_cuda_simhash(const struct kvc_simhash_params *p, void *stream);
enum kvc_status kvc_cuda_lsh_attention(const struct kvc_lsh_attention_params *p, void *stream);
enum kvc_status kvc_cuda_slerp_merge(const struct kvc_slerp_merge_params *p, void *stream);
enum kvc_status kvc_cuda_slerp_restore(const struct kvc_slerp_restore_params *p, void *stream);
enum kvc_status kvc_cuda_minicache_attention(const struct kvc_minicache_attention_params *p, void *stream);

size_t kvc_cuda_head_budgets_workspace(const struct kvc_head_budgets_params *p);
enum kvc_status kvc_cuda_head_budgets(const struct kvc_head_budgets_params *p, void *stream);

size_t kvc_cuda_evict_merge_workspace(const struct kvc_evict_merge_params *p);
enum kvc_status kvc_cuda_evict_merge(const struct kvc_evict_merge_params *p, void *stream);

enum kvc_status kvc_cuda_span_merge(const struct kvc_span_merge_params *p, void *stream);

enum kvc_status kvc_cuda_pooled_counts(const struct kvc_pooled_counts_params *p, void *stream);
enum kvc_status kvc_cuda_row_cosine(const struct kvc_row_cosine_params *p, void *stream);

size_t kvc_cuda_attention_workspace(const struct kvc_attention_params *p);
enum kvc_status kvc_cuda_attention(const struct kvc_attention_params *p, void *stream);

/* pack scans for NaN/Inf and reads the result back (a synchronisation)
 * before it writes anything, so that it can report KVC_ERR_NAN. */
size_t kvc_cuda_pack_workspace(const struct kvc_pack_params *p);
enum kvc_status kvc_cuda_pack(const struct kvc_pack_params *p, void *stream);
enum kvc_status kvc_cuda_unpack(const struct kvc_unpack_params *p, void *stream);

size_t kvc_cuda_packed_attention_workspace(const struct kvc_packed_attention_params *p);
enum kvc_status kvc_cuda_packed_attention(const struct kvc_packed_attention_params *p, void *stream);

/* kvcrush_pick takes no workspace: one block per row, its per-head
 * thresholds, anchor and distance counters in shared memory. */
enum kvc_status kvc_cuda_kvcrush_pick(const struct kvc_kvcrush_pick_params *p, void *stream);
enum kvc_status kvc_cuda_kvmerger_sets(const struct kvc_kvmerger_sets_params *p, void *stream);
enum kvc_status kvc_cuda_gauss_merge(const struct kvc_gauss_merge_params *p, void *stream);
size_t kvc_cuda_actqkv_scores_workspace(const struct kvc_actqkv_scores_params *p);
enum kvc_status kvc_cuda_actqkv_scores(const struct kvc_actqkv_scores_params *p, void *stream);
size_t kvc_cuda_fastgen_recovery_workspace(const struct kvc_fastgen_recovery_params *p);
enum kvc_status kvc_cuda_fastgen_recovery(const struct kvc_fastgen_recovery_params *p, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* KVC_CUDA_H */
