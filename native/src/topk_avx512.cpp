// The avx512 build of the top-k kernel (see topk_kernel-inl.h); compiled with this level's flags only.
#define EDGEREC_NS avx512
#define EDGEREC_W 16
#include "topk_kernel-inl.h"
