// The avx2 build of the top-k kernel (see topk_kernel-inl.h); compiled with this level's flags only.
#define EDGEREC_NS avx2
#define EDGEREC_W 8
#include "topk_kernel-inl.h"
