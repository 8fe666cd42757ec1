// The scalar build of the top-k kernel (see topk_kernel-inl.h); compiled with this level's flags only.
#define EDGEREC_NS scalar
#define EDGEREC_W 1
#include "topk_kernel-inl.h"
