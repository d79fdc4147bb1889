// The activations of the fused ops (forward_act, elemt_act, backward_act),
// shared by the kernels and the op files. Only the enum: the per-ISA CPU
// loops include this, and must not instantiate inline code (loops.h).
//
//   y = act(BN(x) + residual)      act: identity, relu, leaky_relu (slope),
//                                       silu, gelu (erf), gelu_tanh
//   y = BN(relu(x))                the schemas' act "pre_relu" (no residual)
#pragma once

namespace bnfast {

enum class Act : int { kIdentity, kRelu, kLeakyRelu, kSilu, kGelu, kGeluTanh };

}  // namespace bnfast
