// The avx512_vnni build of the top-k kernel and the session encoder (topk_kernel-inl.h, encoder-inl.h);
// compiled with this level's flags only.
#define EDGEREC_NS avx512_vnni
#define EDGEREC_W 16
#include "topk_kernel-inl.h"
#include "encoder-inl.h"
