// The feature macros of AVX2/FMA/F16C, which sleef.h and ATen test: a `#pragma GCC target`
// enables the instructions but does not define them. Included after that pragma by
// isa_avx2_begin.h and isa_avx512_begin.h (whose target includes these), as -mavx2 -mfma -mf16c
// would define them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
