// The neon_dotprod build of the top-k kernel (see topk_kernel-inl.h); compiled with this level's flags only
// (-march=armv8.2-a+dotprod: SDOT / vdotq_s32). dispatch.cpp picks it where getauxval(AT_HWCAP) has HWCAP_ASIMDDP.
#define EDGEREC_NS neon_dotprod
#define EDGEREC_W 4
#include "topk_kernel-inl.h"
#include "encoder-inl.h"
