// The neon build of the top-k kernel (see topk_kernel-inl.h); compiled with this level's flags only.
#define EDGEREC_NS neon
#define EDGEREC_W 4
#include "topk_kernel-inl.h"
