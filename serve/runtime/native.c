/* loradock's C kernels: what torch runs as many tiny ops, done in one call.
 *
 * Compiled once per machine by serve/runtime/native.py (-O3 -march=native) and called through
 * ctypes. GCC vector extensions keep it portable; the hot loops work in vectors of one
 * register (VW lanes: 16 on AVX-512, 8 on AVX2; NEON keeps 16-lane ones, four registers).
 *
 * sgmv_<dtype>: the multi-LoRA delta of one fused projection for the rows of one rank's pool
 * (serve/runtime/lora.py), Punica's SGMV as one loop nest. Rows come grouped by adapter
 * (segments); for each block of up to RB rows of one adapter:
 *   h[i]         = x[row_i] @ A^T[slot]               (A^T: [in, parts * r], fp32 accumulators)
 *   out[row_i]  += h[i][p r : (p + 1) r] @ B^T_p[slot]  for each part p, at its column offset
 * Only the slots the rows use are read; each adapter keeps its own rank (one call per pool).
 * The blocks are the work items of the thread pool below (a mixed batch's adapters, or one
 * adapter's row blocks, on every thread); each output row belongs to one block.
 * bf16 inputs are widened to fp32, products accumulate in fp32, and out is rounded once
 * (round to nearest even), as torch's bf16 matmuls do.
 *
 * Also here, each described where it is defined: decode attention, a linear layer from NF4
 * codes for a few rows, and the element-wise work between matmuls (RMSNorm fused with the
 * residual add before it, silu(gate) * up, RoPE). All of them split their work over the one
 * thread pool below.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

#define RB 4 /* rows per block: A and B rows are read once per block */
#define JW 4 /* 16-lane column chunks per expand block */

static inline float bf2f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Loads and stores of N-lane float vectors V from fp32 or bf16 memory (U, H: the same lanes as
 * uint32 and uint16). bf16 stores round to nearest even and keep NaNs quiet, as f2bf. */
#define DEFINE_VEC_IO(N, V, U, H)                                                              \
    static inline V load##N##_f32(const float *p) {                                            \
        V v;                                                                                   \
        memcpy(&v, p, sizeof(V));                                                              \
        return v;                                                                              \
    }                                                                                          \
    static inline V load##N##_bf16(const uint16_t *p) {                                        \
        H h;                                                                                   \
        memcpy(&h, p, sizeof(H));                                                              \
        U u = __builtin_convertvector(h, U) << 16;                                             \
        V f;                                                                                   \
        memcpy(&f, &u, sizeof(V));                                                             \
        return f;                                                                              \
    }                                                                                          \
    static inline void store##N##_f32(float *p, V v) { memcpy(p, &v, sizeof(V)); }            \
    static inline void store##N##_bf16(uint16_t *p, V f) {                                     \
        U u;                                                                                   \
        memcpy(&u, &f, sizeof(V));                                                             \
        U nan = (U)((u & 0x7fffffffu) > 0x7f800000u);                                          \
        U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                                    \
        U r = (nan & ((u >> 16) | 0x40u)) | (~nan & rounded);                                  \
        H h = __builtin_convertvector(r, H);                                                   \
        memcpy(p, &h, sizeof(H));                                                              \
    }

DEFINE_VEC_IO(16, v16f, v16u, v16h)

/* One register of floats, for the LoRA kernel's register blocks: VW lanes. With AVX2 and no
 * AVX-512, 16-lane vectors are two registers each; GCC then spilled the accumulators and built
 * each broadcast through the stack (one layer's deltas, fp32, three batch shapes: 1.23 ms
 * against 0.24 ms for the AVX-512 build). */
#if defined(__AVX2__) && !defined(__AVX512F__)
#define VW 8
#else
#define VW 16
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
DEFINE_VEC_IO(v, vf, vu, vh)

static inline float load1_f32(const float *p) { return *p; }
static inline float load1_bf16(const uint16_t *p) { return bf2f(*p); }
static inline void addout_f32(float *o, float d) { *o += d; }
static inline void addout_bf16(uint16_t *o, float d) { *o = f2bf(bf2f(*o) + d); }
static inline void store1_f32(float *o, float d) { *o = d; }
static inline void store1_bf16(uint16_t *o, float d) { *o = f2bf(d); }

/* The kernels' thread pool: a job's work items [0, total) are cut into chunks, and every thread
 * taking part (the caller and up to threads - 1 workers kept for the process) claims chunks
 * until none are left. The caller then waits only for chunks that were claimed and are not
 * done: a worker that has not woken up yet (its core busy with other work, as on two cores
 * shared with the HTTP loop and the adapter loader) claims nothing and delays nothing; the
 * caller does its share. Claims are one compare-and-swap on a word holding the job's
 * generation and the next chunk, closed when the job ends, so a late worker can never claim a
 * chunk of a finished job.
 * Workers spin briefly after a job, since the next kernel often follows within microseconds,
 * then sleep on a condition variable. A kernel too small to split (the LoRA delta of one row)
 * runs on the caller alone and extends that spin: while a pass keeps calling kernels the
 * workers stay awake (measured at one row with an adapter: waking them after each such kernel
 * cost 1.5 ms of a 15 ms decode step). One job at a time (callers on several threads queue).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define POOL_MAX 64
#define SPIN_NS 60000  /* how long an idle worker spins before it sleeps */

typedef void (*task_fn)(void *ctx, int64_t lo, int64_t hi);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int workers;            /* started so far */
    atomic_uint_fast64_t word;  /* generation << 32 | next chunk to claim */
    task_fn fn;
    void *ctx;
    int64_t total, chunk, chunks;
    int helpers;            /* workers that may take part in the current job */
    atomic_int_fast64_t done;   /* chunks finished in the current job */
    atomic_int_fast64_t touched;  /* when a kernel last ran on the caller alone (ns) */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* One job at a time: callers on several threads queue here. */
static pthread_mutex_t job_mu = PTHREAD_MUTEX_INITIALIZER;

/* A worker's first generation is read by its creator, before the job that needs it is posted:
 * read by the new thread itself, it could already be that job's, which it would then miss. */
static uint32_t start_gen[POOL_MAX];

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of generation `gen` until none are left or the job is another one. */
static void run_chunks(uint32_t gen) {
    for (;;) {
        uint_fast64_t w = atomic_load_explicit(&pool.word, memory_order_acquire);
        if ((uint32_t)(w >> 32) != gen || (int64_t)(uint32_t)w >= pool.chunks) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.word, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        /* The claimed chunk keeps this job current until it is counted done. */
        int64_t lo = (int64_t)(uint32_t)w * pool.chunk;
        int64_t hi = lo + pool.chunk < pool.total ? lo + pool.chunk : pool.total;
        pool.fn(pool.ctx, lo, hi);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = start_gen[id];
    for (;;) {
        int64_t until = now_ns() + SPIN_NS;
        while ((uint32_t)(atomic_load_explicit(&pool.word, memory_order_acquire) >> 32) == seen) {
            cpu_relax();
            int64_t t = now_ns();
            if (t > until) {
                int64_t touched = atomic_load_explicit(&pool.touched, memory_order_relaxed);
                if (touched + SPIN_NS > t) { /* kernels are still running on the caller */
                    until = touched + SPIN_NS;
                    continue;
                }
                pthread_mutex_lock(&pool.mu);
                while ((uint32_t)(atomic_load(&pool.word) >> 32) == seen)
                    pthread_cond_wait(&pool.cv, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
            }
        }
        seen = (uint32_t)(atomic_load_explicit(&pool.word, memory_order_acquire) >> 32);
        if (id < pool.helpers) run_chunks(seen);
    }
    return NULL;
}

/* Run fn over [0, total) in pieces of `chunk` on `threads` threads (the caller's included). */
static void parallel(task_fn fn, void *ctx, int64_t total, int64_t chunk, int threads) {
    int64_t chunks = (total + chunk - 1) / chunk;
    int helpers = threads - 1;
    if (helpers > POOL_MAX) helpers = POOL_MAX;
    if (helpers > chunks - 1) helpers = (int)(chunks - 1);
    if (helpers <= 0 || chunks >= UINT32_MAX) {
        fn(ctx, 0, total);
        if (pool.workers) atomic_store_explicit(&pool.touched, now_ns(), memory_order_relaxed);
        return;
    }
    pthread_mutex_lock(&job_mu);
    uint32_t gen = (uint32_t)(atomic_load(&pool.word) >> 32) + 1;
    while (pool.workers < helpers) {
        pthread_t t;
        start_gen[pool.workers] = gen - 1;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)pool.workers) != 0) break;
        pthread_detach(t);
        pool.workers++;
    }
    if (helpers > pool.workers) helpers = pool.workers;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.total = total;
    pool.chunk = chunk;
    pool.chunks = chunks;
    pool.helpers = helpers;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.mu);
    atomic_store_explicit(&pool.word, (uint_fast64_t)gen << 32, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    run_chunks(gen);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) cpu_relax();
    /* Closed before the next job's fields are written: a worker that read this word earlier
     * and the next job's chunk count later then fails its claim instead of taking a chunk. */
    atomic_store_explicit(&pool.word, (uint_fast64_t)gen << 32 | UINT32_MAX, memory_order_release);
    pthread_mutex_unlock(&job_mu);
}

#define KT 512 /* input columns widened to fp32 per pass of the LoRA shrink */

static inline void widen_f32(const float *x, float *out, int n) {
    memcpy(out, x, sizeof(float) * (size_t)n);
}

static inline void widen_bf16(const uint16_t *x, float *out, int n) {
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        v16f v = load16_bf16(x + k);
        memcpy(out + k, &v, 64);
    }
    for (; k < n; k++) out[k] = bf2f(x[k]);
}

/* The SGMV block: R rows of one adapter, nb of them real (the others repeat the first row and
 * are not written). R is a compile-time count once inlined: 1 and 2 for blocks of one or two
 * rows (a single stream; 16 rows over 8 adapters), so they do not pay for RB rows of products
 * (one layer's four deltas at one row, with the 16-lane output adds: 40 -> 31 us). */
#define DEFINE_SGMV(NAME, T, SFX)                                                              \
    struct NAME##_job {                                                                        \
        const int32_t *seg_slot, *seg_start, *rows, *items;                                    \
        int in_f, pr, r, parts;                                                                \
        const T *x, *at;                                                                       \
        const T *const *bt;                                                                    \
        const int64_t *sizes, *offsets;                                                        \
        int64_t x_stride, out_stride;                                                          \
        T *out;                                                                                \
    };                                                                                         \
    static inline __attribute__((always_inline)) void NAME##_block(                            \
            const struct NAME##_job *jb, int s, int b0, int nb, const int R, float *h) {       \
        const int in_f = jb->in_f, pr = jb->pr, r = jb->r;                                     \
        const int64_t out_stride = jb->out_stride;                                             \
        int64_t slot = jb->seg_slot[s];                                                        \
        const T *a = jb->at + slot * (int64_t)in_f * pr;                                       \
        const int32_t *rw = jb->rows + b0;                                                     \
        const T *xr[RB];                                                                       \
        for (int i = 0; i < R; i++) xr[i] = jb->x + (int64_t)rw[i < nb ? i : 0] * jb->x_stride; \
        /* shrink, VW columns of h at a time, the R rows sharing each load of A; the rows'   \
           inputs are widened to fp32 KT columns at a time first, so each product is one      \
           broadcast multiply-add from memory instead of a scalar load and widening per row */ \
        float xf[RB * KT];                                                                     \
        memset(h, 0, sizeof(float) * (size_t)(R * pr));                                        \
        for (int k0 = 0; k0 < in_f; k0 += KT) {                                                \
            const int kn = in_f - k0 < KT ? in_f - k0 : KT;                                    \
            for (int i = 0; i < R; i++) widen_##SFX(xr[i] + k0, xf + i * KT, kn);              \
            const T *ak = a + (int64_t)k0 * pr;                                                \
            int j = 0;                                                                         \
            for (; j + VW <= pr; j += VW) {                                                    \
                vf acc[RB];                                                                    \
                for (int i = 0; i < R; i++) acc[i] = loadv_f32(h + i * pr + j);                \
                for (int k = 0; k < kn; k++) {                                                 \
                    vf av = loadv_##SFX(ak + (int64_t)k * pr + j);                            \
                    for (int i = 0; i < R; i++) acc[i] += xf[i * KT + k] * av;                 \
                }                                                                              \
                for (int i = 0; i < R; i++) storev_f32(h + i * pr + j, acc[i]);                \
            }                                                                                  \
            for (; j < pr; j++) {                                                              \
                float acc[RB];                                                                 \
                for (int i = 0; i < R; i++) acc[i] = h[i * pr + j];                            \
                for (int k = 0; k < kn; k++) {                                                 \
                    float av = load1_##SFX(ak + (int64_t)k * pr + j);                          \
                    for (int i = 0; i < R; i++) acc[i] += xf[i * KT + k] * av;                 \
                }                                                                              \
                for (int i = 0; i < R; i++) h[i * pr + j] = acc[i];                            \
            }                                                                                  \
        }                                                                                      \
        /* expand, VW * JW output columns at a time, each part at its offset */                \
        for (int p = 0; p < jb->parts; p++) {                                                  \
            int64_t size = jb->sizes[p], offset = jb->offsets[p];                              \
            const T *b = jb->bt[p] + slot * (int64_t)r * size;                                 \
            const float *hp = h + p * r;                                                       \
            int64_t c = 0;                                                                     \
            for (; c + VW * JW <= size; c += VW * JW) {                                        \
                vf acc[RB][JW] = {{0}};                                                        \
                for (int t = 0; t < r; t++) {                                                  \
                    const T *brow = b + (int64_t)t * size + c;                                 \
                    vf bv[JW];                                                                 \
                    for (int q = 0; q < JW; q++) bv[q] = loadv_##SFX(brow + VW * q);            \
                    for (int i = 0; i < R; i++) {                                              \
                        float hv = hp[i * pr + t];                                             \
                        for (int q = 0; q < JW; q++) acc[i][q] += hv * bv[q];                  \
                    }                                                                          \
                }                                                                              \
                for (int i = 0; i < nb; i++) {                                                 \
                    T *o = jb->out + (int64_t)rw[i] * out_stride + offset + c;                 \
                    for (int q = 0; q < JW; q++)                                               \
                        storev_##SFX(o + VW * q, loadv_##SFX(o + VW * q) + acc[i][q]);       \
                }                                                                              \
            }                                                                                  \
            for (; c < size; c++) {                                                            \
                float acc[RB] = {0};                                                           \
                for (int t = 0; t < r; t++) {                                                  \
                    float bv = load1_##SFX(b + (int64_t)t * size + c);                         \
                    for (int i = 0; i < R; i++) acc[i] += hp[i * pr + t] * bv;                 \
                }                                                                              \
                for (int i = 0; i < nb; i++)                                                   \
                    addout_##SFX(jb->out + (int64_t)rw[i] * out_stride + offset + c, acc[i]);  \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    /* work items lo .. hi - 1: item i is the block of up to RB rows of segment items[2 i]     \
       starting at row index items[2 i + 1] */                                                 \
    static void NAME##_items(void *ctx, int64_t lo, int64_t hi) {                              \
        const struct NAME##_job *jb = ctx;                                                     \
        float h[RB * jb->pr];                                                                  \
        for (int64_t item = lo; item < hi; item++) {                                           \
            int s = jb->items[2 * item], b0 = jb->items[2 * item + 1];                         \
            int nb = jb->seg_start[s + 1] - b0;                                                \
            if (nb > RB) nb = RB;                                                              \
            if (nb == 1)                                                                       \
                NAME##_block(jb, s, b0, 1, 1, h);                                              \
            else if (nb == 2)                                                                  \
                NAME##_block(jb, s, b0, 2, 2, h);                                              \
            else                                                                               \
                NAME##_block(jb, s, b0, nb, RB, h);                                            \
        }                                                                                      \
    }                                                                                          \
    void NAME(int nseg, const int32_t *seg_slot, const int32_t *seg_start,                     \
              const int32_t *rows, int in_f, const T *x, int64_t x_stride, const T *at,        \
              int pr, int r, int parts, const T *const *bt, const int64_t *sizes,              \
              const int64_t *offsets, T *out, int64_t out_stride, int threads) {               \
        int nitems = 0;                                                                        \
        for (int s = 0; s < nseg; s++) nitems += (seg_start[s + 1] - seg_start[s] + RB - 1) / RB; \
        int32_t items[2 * nitems + 2];                                                         \
        for (int s = 0, i = 0; s < nseg; s++)                                                  \
            for (int b0 = seg_start[s]; b0 < seg_start[s + 1]; b0 += RB, i++) {                \
                items[2 * i] = s;                                                              \
                items[2 * i + 1] = b0;                                                         \
            }                                                                                  \
        struct NAME##_job jb = {seg_slot, seg_start, rows, items, in_f, pr, r, parts, x, at,   \
                                bt, sizes, offsets, x_stride, out_stride, out};                \
        parallel(NAME##_items, &jb, nitems, 1, threads);                                       \
    }

DEFINE_SGMV(sgmv_f32, float, f32)
DEFINE_SGMV(sgmv_bf16, uint16_t, bf16)

/* decode_attn_<dtype>: attention of single query tokens over their sequences' cached keys.
 *
 * Query i's heads q[i] ([heads * d], heads = kv_heads * groups, grouped-query heads sharing a
 * kv head are consecutive) attend to the keys and values of KV-cache row kv_rows[i] (i when
 * kv_rows is NULL) at positions lo[i] .. hi[i] - 1 (causal, and the sliding window where the
 * layer has one). A decode row is one query; a short prompt chunk is one query per token, its
 * keys written to the cache first:
 *   s_j = scale * q . k_j  (then softcap * tanh(s_j / softcap) where softcap > 0),
 *   out = sum_j softmax(s)_j v_j,
 * in fp32, written to out[i] ([heads * d], rounded once for bf16). Keys of one kv head are read
 * once for all its query heads. Each (query, kv head) pair is one work item of the thread pool.
 */

static inline float fast_exp(float x) {
    /* e^x = 2^n * e^r, |r| <= ln2/2; degree-6 Taylor on r: relative error < 2e-7 */
    if (x < -87.0f) return 0.0f;
    float n = x * 1.44269504f + 12582912.0f;
    n -= 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666667f + r * (0.0416666667f
              + r * (0.00833333333f + r * 0.00138888889f)))));
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline float hsum16(v16f v) {
    v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
            + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float hsumv(vf v) {
#if VW == 16
    return hsum16(v);
#else
    v4f b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#endif
}

#define MAXC (256 / VW) /* head_dim up to 256 in VW-lane chunks; wider heads: the scalar path */
#define ATTN_STACK 4096 /* scores kept on the stack up to this many floats, else on the heap */

#define DEFINE_ATTN(NAME, T, SFX)                                                              \
    struct NAME##_job {                                                                        \
        int kv_heads, groups, d;                                                               \
        const T *q, *k, *v;                                                                    \
        int64_t q_stride, row_stride, head_stride, out_stride;                                 \
        const int32_t *kv_rows, *lo, *hi;                                                      \
        float scale, softcap;                                                                  \
        T *out;                                                                                \
    };                                                                                         \
    /* work items lo .. hi - 1: item t is query t / kv_heads, kv head t % kv_heads */          \
    static void NAME##_items(void *ctx, int64_t first, int64_t last) {                         \
        const struct NAME##_job *jb = ctx;                                                     \
        const int groups = jb->groups, d = jb->d;                                              \
        float qf[groups * d];                                                                  \
        float acc[groups * d];                                                                 \
        float stack_scores[ATTN_STACK];                                                        \
        int chunks = (d % VW == 0 && d / VW <= MAXC) ? d / VW : 0;                            \
        for (int64_t t = first; t < last; t++) {                                              \
            int64_t i = t / jb->kv_heads;                                                      \
            int h = (int)(t % jb->kv_heads);                                                   \
            int a = jb->lo[i], b = jb->hi[i];                                                  \
            int64_t kr = jb->kv_rows ? jb->kv_rows[i] : i;                                     \
            float *scores = stack_scores;                                                      \
            if ((int64_t)groups * b > ATTN_STACK) {                                            \
                scores = malloc(sizeof(float) * (size_t)groups * (size_t)b);                   \
                if (!scores) continue; /* out of memory: this head's output is left as is */   \
            }                                                                                  \
            const T *qi = jb->q + i * jb->q_stride + (int64_t)h * groups * d;                  \
            for (int e = 0; e < groups * d; e++) qf[e] = load1_##SFX(qi + e) * jb->scale;      \
            const T *kh = jb->k + kr * jb->row_stride + (int64_t)h * jb->head_stride;          \
            const T *vh = jb->v + kr * jb->row_stride + (int64_t)h * jb->head_stride;          \
            float mx[groups];                                                                  \
            for (int g = 0; g < groups; g++) mx[g] = -INFINITY;                                \
            for (int j = a; j < b; j++) {                                                      \
                const T *kj = kh + (int64_t)j * d;                                             \
                vf kv[MAXC];                                                                   \
                for (int c = 0; c < chunks; c++) kv[c] = loadv_##SFX(kj + VW * c);              \
                for (int g = 0; g < groups; g++) {                                             \
                    const float *qg = qf + g * d;                                              \
                    float s;                                                                   \
                    if (chunks) {                                                              \
                        vf dot = {0};                                                          \
                        for (int c = 0; c < chunks; c++) dot += loadv_f32(qg + VW * c) * kv[c];  \
                        s = hsumv(dot);                                                        \
                    } else {                                                                   \
                        s = 0.0f;                                                              \
                        for (int e = 0; e < d; e++) s += qg[e] * load1_##SFX(kj + e);          \
                    }                                                                          \
                    if (jb->softcap > 0.0f) s = jb->softcap * tanhf(s / jb->softcap);          \
                    scores[g * b + j] = s;                                                     \
                    if (s > mx[g]) mx[g] = s;                                                  \
                }                                                                              \
            }                                                                                  \
            memset(acc, 0, sizeof(float) * groups * d);                                        \
            for (int g = 0; g < groups; g++) {                                                 \
                float *sg = scores + g * b, sum = 0.0f;                                        \
                for (int j = a; j < b; j++) {                                                  \
                    sg[j] = fast_exp(sg[j] - mx[g]);                                           \
                    sum += sg[j];                                                              \
                }                                                                              \
                float inv = 1.0f / sum;                                                        \
                for (int j = a; j < b; j++) sg[j] *= inv;                                      \
            }                                                                                  \
            for (int j = a; j < b; j++) {                                                      \
                const T *vj = vh + (int64_t)j * d;                                             \
                if (chunks) {                                                                  \
                    vf vv[MAXC];                                                               \
                    for (int c = 0; c < chunks; c++) vv[c] = loadv_##SFX(vj + VW * c);          \
                    for (int g = 0; g < groups; g++) {                                         \
                        float p = scores[g * b + j];                                           \
                        float *ag = acc + g * d;                                               \
                        for (int c = 0; c < chunks; c++) {                                     \
                            vf u = loadv_f32(ag + VW * c) + p * vv[c];                         \
                            storev_f32(ag + VW * c, u);                                        \
                        }                                                                      \
                    }                                                                          \
                } else {                                                                       \
                    for (int g = 0; g < groups; g++) {                                         \
                        float p = scores[g * b + j];                                           \
                        float *ag = acc + g * d;                                               \
                        for (int e = 0; e < d; e++) ag[e] += p * load1_##SFX(vj + e);          \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            T *oi = jb->out + i * jb->out_stride + (int64_t)h * groups * d;                    \
            for (int e = 0; e < groups * d; e++) store1_##SFX(oi + e, acc[e]);                 \
            if (scores != stack_scores) free(scores);                                          \
        }                                                                                      \
    }                                                                                          \
    void NAME(int n, int kv_heads, int groups, int d, const T *q, int64_t q_stride,           \
              const T *k, const T *v, int64_t row_stride, int64_t head_stride,                \
              const int32_t *kv_rows, const int32_t *lo, const int32_t *hi, float scale,      \
              float softcap, T *out, int64_t out_stride, int threads) {                       \
        struct NAME##_job jb = {kv_heads, groups, d, q, k, v, q_stride, row_stride,            \
                                head_stride, out_stride, kv_rows, lo, hi, scale, softcap, out}; \
        parallel(NAME##_items, &jb, (int64_t)n * kv_heads, 1, threads);                        \
    }

DEFINE_ATTN(decode_attn_f32, float, f32)
DEFINE_ATTN(decode_attn_bf16, uint16_t, bf16)

/* nf4_linear_<dtype>: y[i] = x[i] @ W^T (+ bias) for a few rows, W held as its 4-bit codes.
 *
 * Where a decode step has one to a few rows, it reads every weight once and does a handful of
 * flops per byte: it is bound by memory bandwidth, and the bytes are the cost. An nf4-dense
 * base (hub/nf4.py) is exactly 16 values per block of 64 weights times the block's scale, so
 * it is held here as 4-bit codes (0.5 byte per weight, a quarter of bf16) plus one fp32 scale
 * per block, and decoded in registers: the code is an index into the 16-entry table, one
 * permute per 16 weights. Layout (serve/runtime/nf4_kernel.py packs it): row j's block b is
 * 32 bytes at codes + j * k / 2 + 32 b, byte t holding element 64 b + t in its low nibble and
 * 64 b + 32 + t in its high one; scales[j * k / 64 + b]. Products accumulate in fp32 against
 * the exact fp32 weight values (code value times scale); out is rounded once.
 * Rows of W are split over `threads` threads (the pool above).
 */
#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

#define NF4_MAXM 4     /* rows decoded together; more rows are done as several passes */
#define NF4_CHUNK 16   /* output rows per work item */

struct nf4_job {
    int m, k;
    const float *x;          /* [m, k] fp32 */
    const uint8_t *codes;
    const float *scales;
    const float *table;
    float *y;                /* [m, n] fp32 */
    int64_t n;
};

/* One block's 64 weights in element order, 64 / VW vectors (before the block's scale). */
#define NF4_NW (64 / VW)
#if VW == 8
/* AVX2 has no 16-entry permute: two 8-entry vpermps on the table's halves (they read the low
 * three bits of the code), and bit 3 picks the half. Eight codes are widened once and give
 * eight low-nibble weights (elements t..) and eight high-nibble ones (elements 32 + t..). In
 * 16-lane vectors GCC turned the table lookup into scalar code here, then spilled the
 * accumulators (measured at one SmolLM2 layer, one row: 0.69 ms, then 0.34 ms with the
 * permutes alone; dense fp32 0.27 ms). */
static inline void nf4_block(const vf *table, const uint8_t *c, vf *w) {
    __m256 t0, t1;
    memcpy(&t0, &table[0], 32);
    memcpy(&t1, &table[1], 32);
    for (int g = 0; g < 4; g++) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8 * g)));
        __m256i idx[2] = {_mm256_and_si256(bytes, _mm256_set1_epi32(15)),
                          _mm256_srli_epi32(bytes, 4)};
        for (int h = 0; h < 2; h++) {
            __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx[h]),
                                        _mm256_permutevar8x32_ps(t1, idx[h]),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(idx[h], 28)));
            memcpy(&w[4 * h + g], &v, 32);
        }
    }
}
#else
static inline v16f nf4_decode(v16f table, v16b bytes) {
#if defined(__GNUC__) && !defined(__clang__)
    v16i idx = __builtin_convertvector(bytes, v16i);
    return __builtin_shuffle(table, idx);  /* one vpermps on AVX-512 */
#else
    v16f w;  /* clang has no variable-index vector shuffle builtin */
    for (int t = 0; t < 16; t++) w[t] = table[bytes[t]];
    return w;
#endif
}

static inline void nf4_block(const vf *table, const uint8_t *c, vf *w) {
    v16b raw[2];
    memcpy(raw, c, 32);
    w[0] = nf4_decode(table[0], raw[0] & 15);
    w[1] = nf4_decode(table[0], raw[1] & 15);
    w[2] = nf4_decode(table[0], raw[0] >> 4);
    w[3] = nf4_decode(table[0], raw[1] >> 4);
}
#endif

#define DEFINE_NF4_ROWS(M)                                                                     \
    static void nf4_rows_##M(const struct nf4_job *jb, int64_t lo, int64_t hi) {               \
        vf table[16 / VW];                                                                     \
        memcpy(table, jb->table, 64);                                                          \
        int k = jb->k, blocks = k / 64;                                                        \
        for (int64_t j = lo; j < hi; j++) {                                                    \
            const uint8_t *c = jb->codes + j * (int64_t)(k / 2);                               \
            const float *s = jb->scales + j * (int64_t)blocks;                                 \
            vf acc[M] = {0};                                                                   \
            for (int b = 0; b < blocks; b++) {                                                 \
                vf w[NF4_NW];                                                                  \
                nf4_block(table, c + 32 * b, w);                                               \
                for (int i = 0; i < M; i++) {                                                  \
                    const float *xi = jb->x + (int64_t)i * k + 64 * b;                         \
                    vf part = w[0] * loadv_f32(xi);                                            \
                    for (int q = 1; q < NF4_NW; q++) part += w[q] * loadv_f32(xi + VW * q);    \
                    acc[i] += s[b] * part;                                                     \
                }                                                                              \
            }                                                                                  \
            for (int i = 0; i < M; i++) jb->y[(int64_t)i * jb->n + j] = hsumv(acc[i]);         \
        }                                                                                      \
    }
DEFINE_NF4_ROWS(1)
DEFINE_NF4_ROWS(2)
DEFINE_NF4_ROWS(3)
DEFINE_NF4_ROWS(4)

static void nf4_task(void *ctx, int64_t lo, int64_t hi) {
    const struct nf4_job *jb = ctx;
    switch (jb->m) {
    case 1: nf4_rows_1(jb, lo, hi); break;
    case 2: nf4_rows_2(jb, lo, hi); break;
    case 3: nf4_rows_3(jb, lo, hi); break;
    default: nf4_rows_4(jb, lo, hi); break;
    }
}

#define DEFINE_NF4_LINEAR(NAME, T, SFX)                                                        \
    int NAME(int m, int k, int64_t n, const T *x, int64_t x_stride, const uint8_t *codes,      \
             const float *scales, const float *table, const T *bias, T *out,                   \
             int64_t out_stride, int threads) {                                                \
        if (k % 64) return -1;                                                                 \
        float *xf = malloc(sizeof(float) * (size_t)NF4_MAXM * (size_t)(k + n));                \
        if (!xf) return -2;                                                                    \
        float *yf = xf + (size_t)NF4_MAXM * k;                                                 \
        for (int r0 = 0; r0 < m; r0 += NF4_MAXM) {                                             \
            int mm = m - r0 < NF4_MAXM ? m - r0 : NF4_MAXM;                                    \
            for (int i = 0; i < mm; i++)                                                       \
                for (int e = 0; e < k; e++)                                                    \
                    xf[(int64_t)i * k + e] = load1_##SFX(x + (int64_t)(r0 + i) * x_stride + e);\
            struct nf4_job jb = {mm, k, xf, codes, scales, table, yf, n};                      \
            parallel(nf4_task, &jb, n, NF4_CHUNK, threads);                                    \
            for (int i = 0; i < mm; i++) {                                                     \
                T *o = out + (int64_t)(r0 + i) * out_stride;                                   \
                for (int64_t j = 0; j < n; j++)                                                \
                    store1_##SFX(o + j, yf[(int64_t)i * n + j]                                 \
                                 + (bias ? load1_##SFX(bias + j) : 0.0f));                     \
            }                                                                                  \
        }                                                                                      \
        free(xf);                                                                              \
        return 0;                                                                              \
    }

DEFINE_NF4_LINEAR(nf4_linear_f32, float, f32)
DEFINE_NF4_LINEAR(nf4_linear_bf16, uint16_t, bf16)

/* rms_norm_<dtype>: y[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w, and, with a residual r,
 * first x[i] += r[i] in place (rounded to the dtype, as torch's in-place add), so that the
 * residual add before a norm and the norm are one pass: vLLM's fused_add_rms_norm.
 * Sums of squares and products are fp32; y is rounded once. Rows are split over `threads`
 * threads (the pool above), RB rows per work item.
 */
#define DEFINE_NORM(NAME, T, SFX)                                                              \
    struct NAME##_job {                                                                        \
        int d;                                                                                 \
        T *x;                                                                                  \
        const T *res, *w;                                                                      \
        T *y;                                                                                  \
        int64_t x_stride, res_stride, y_stride;                                                \
        float eps;                                                                             \
    };                                                                                         \
    static void NAME##_rows(void *ctx, int64_t lo, int64_t hi) {                               \
        const struct NAME##_job *jb = ctx;                                                     \
        const int d = jb->d;                                                                   \
        float buf[d];                                                                          \
        for (int64_t i = lo; i < hi; i++) {                                                    \
            T *x = jb->x + i * jb->x_stride;                                                   \
            const T *r = jb->res ? jb->res + i * jb->res_stride : NULL;                        \
            v16f sq = {0};                                                                     \
            float tail = 0.0f;                                                                 \
            int e = 0;                                                                         \
            for (; e + 16 <= d; e += 16) {                                                     \
                v16f v = load16_##SFX(x + e);                                                  \
                if (r) {                                                                       \
                    store16_##SFX(x + e, v + load16_##SFX(r + e));                             \
                    v = load16_##SFX(x + e); /* the rounded sum, as the residual keeps it */   \
                }                                                                              \
                store16_f32(buf + e, v);                                                       \
                sq += v * v;                                                                   \
            }                                                                                  \
            for (; e < d; e++) {                                                               \
                if (r) store1_##SFX(x + e, load1_##SFX(x + e) + load1_##SFX(r + e));           \
                buf[e] = load1_##SFX(x + e);                                                   \
                tail += buf[e] * buf[e];                                                       \
            }                                                                                  \
            float inv = 1.0f / sqrtf((hsum16(sq) + tail) / (float)d + jb->eps);                \
            T *y = jb->y + i * jb->y_stride;                                                   \
            for (e = 0; e + 16 <= d; e += 16)                                                  \
                store16_##SFX(y + e, load16_f32(buf + e) * inv * load16_##SFX(jb->w + e));     \
            for (; e < d; e++) store1_##SFX(y + e, buf[e] * inv * load1_##SFX(jb->w + e));     \
        }                                                                                      \
    }                                                                                          \
    void NAME(int64_t n, int d, T *x, int64_t x_stride, const T *res, int64_t res_stride,     \
              const T *w, T *y, int64_t y_stride, float eps, int threads) {                   \
        struct NAME##_job jb = {d, x, res, w, y, x_stride, res_stride, y_stride, eps};         \
        parallel(NAME##_rows, &jb, n, RB, threads);                                            \
    }

DEFINE_NORM(rms_norm_f32, float, f32)
DEFINE_NORM(rms_norm_bf16, uint16_t, bf16)

/* silu_mul_<dtype>: out[i, j] = silu(gu[i, j]) * gu[i, inter + j], the gated MLP's activation
 * over a fused gate|up projection, in fp32, rounded once (torch rounds silu's output, then the
 * product). Rows are split over `threads` threads.
 */
#define DEFINE_SILU_MUL(NAME, T, SFX)                                                          \
    struct NAME##_job {                                                                        \
        int inter;                                                                             \
        const T *gu;                                                                           \
        T *out;                                                                                \
        int64_t gu_stride, out_stride;                                                         \
    };                                                                                         \
    static void NAME##_rows(void *ctx, int64_t lo, int64_t hi) {                               \
        const struct NAME##_job *jb = ctx;                                                     \
        const int inter = jb->inter;                                                           \
        for (int64_t i = lo; i < hi; i++) {                                                    \
            const T *g = jb->gu + i * jb->gu_stride, *u = g + inter;                           \
            T *o = jb->out + i * jb->out_stride;                                               \
            int j = 0;                                                                         \
            for (; j + 16 <= inter; j += 16) {                                                 \
                v16f gv = load16_##SFX(g + j), e;                                              \
                for (int t = 0; t < 16; t++) e[t] = fast_exp(-gv[t]);                          \
                store16_##SFX(o + j, gv / (1.0f + e) * load16_##SFX(u + j));                   \
            }                                                                                  \
            for (; j < inter; j++) {                                                           \
                float gv = load1_##SFX(g + j);                                                 \
                store1_##SFX(o + j, gv / (1.0f + fast_exp(-gv)) * load1_##SFX(u + j));        \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    void NAME(int64_t n, int inter, const T *gu, int64_t gu_stride, T *out, int64_t out_stride, \
              int threads) {                                                                   \
        struct NAME##_job jb = {inter, gu, out, gu_stride, out_stride};                        \
        parallel(NAME##_rows, &jb, n, RB, threads);                                            \
    }

DEFINE_SILU_MUL(silu_mul_f32, float, f32)
DEFINE_SILU_MUL(silu_mul_bf16, uint16_t, bf16)

/* rope_<dtype>: rotary embedding in place on the q|k heads of each token, pair-adjacent layout
 * (serve/runtime/runner.py): x[2p] <- x[2p] c[2p] + x[2p+1] s[2p], x[2p+1] <- x[2p+1] c[2p+1]
 * + x[2p] s[2p+1], with c, s the rows of the (signed) cos/sin tables ([positions, d]) at the
 * token's position; fp32, rounded once. Tokens are split over `threads` threads.
 */
#define DEFINE_ROPE(NAME, T, SFX)                                                              \
    struct NAME##_job {                                                                        \
        int heads, d;                                                                          \
        T *x;                                                                                  \
        int64_t x_stride;                                                                      \
        const int64_t *pos;                                                                    \
        const T *cos, *sin;                                                                    \
    };                                                                                         \
    static void NAME##_rows(void *ctx, int64_t lo, int64_t hi) {                               \
        const struct NAME##_job *jb = ctx;                                                     \
        const int d = jb->d;                                                                   \
        for (int64_t i = lo; i < hi; i++) {                                                    \
            const T *c = jb->cos + jb->pos[i] * d, *s = jb->sin + jb->pos[i] * d;              \
            for (int h = 0; h < jb->heads; h++) {                                              \
                T *x = jb->x + i * jb->x_stride + (int64_t)h * d;                              \
                int e = 0;                                                                     \
                for (; e + 16 <= d; e += 16) {                                                 \
                    v16f v = load16_##SFX(x + e);                                              \
                    v16f w = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11,   \
                                                     10, 13, 12, 15, 14);                      \
                    store16_##SFX(x + e, v * load16_##SFX(c + e) + w * load16_##SFX(s + e));   \
                }                                                                              \
                for (; e + 1 < d; e += 2) {                                                    \
                    float a = load1_##SFX(x + e), b = load1_##SFX(x + e + 1);                  \
                    store1_##SFX(x + e, a * load1_##SFX(c + e) + b * load1_##SFX(s + e));      \
                    store1_##SFX(x + e + 1,                                                    \
                                 b * load1_##SFX(c + e + 1) + a * load1_##SFX(s + e + 1));     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    void NAME(int64_t n, int heads, int d, T *x, int64_t x_stride, const int64_t *pos,         \
              const T *cos, const T *sin, int threads) {                                       \
        struct NAME##_job jb = {heads, d, x, x_stride, pos, cos, sin};                         \
        parallel(NAME##_rows, &jb, n, RB, threads);                                            \
    }

DEFINE_ROPE(rope_f32, float, f32)
DEFINE_ROPE(rope_bf16, uint16_t, bf16)
