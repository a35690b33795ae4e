// The one place the qlib op schemas are defined. CPU and CUDA files only hold
// TORCH_LIBRARY_IMPL blocks.
#include <torch/library.h>

TORCH_LIBRARY(qlib, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "fake_quant(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max) "
      "-> Tensor",
      tags);
  m.def(
      "fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
      "int quant_min, int quant_max, bool scale_grad, bool zero_point_grad) "
      "-> (Tensor, Tensor, Tensor)",
      tags);
  // fake_quant and its straight-through mask (bool, x's shape: true where x's unclamped code
  // lies in [quant_min, quant_max]). fake_quant's autograd takes this path for an x that is not
  // a leaf, saving the 1-byte mask instead of x (as torch's *_cachemask ops);
  // fake_quant_mask_backward gives grad * mask.
  m.def(
      "fake_quant_with_mask(Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max) -> (Tensor output, Tensor mask)",
      tags);
  m.def("fake_quant_mask_backward(Tensor grad, Tensor mask) -> Tensor", tags);
  // fake_quant with LSQ's trained qparams: scale clamped below at eps, zero_point to
  // [quant_min, quant_max]; their gradients are fake_quant's at the clamped values (straight
  // through the clamps), times grad_factor (None: LSQ's 1 / sqrt(x.numel() * quant_max),
  // computed in the op, so a traced dynamic batch stays symbolic).
  m.def(
      "lsq_fake_quant(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "float? grad_factor, float eps) -> Tensor",
      tags);
  m.def(
      "quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "ScalarType dtype) -> Tensor",
      tags);
  m.def("dequantize(Tensor q, Tensor scale, Tensor zero_point, ScalarType dtype) -> Tensor",
        tags);
  m.def(
      "choose_qparams(Tensor min, Tensor max, int quant_min, int quant_max, bool symmetric, "
      "float eps) -> (Tensor, Tensor)",
      tags);
  // int8
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)", tags);
  m.def("int8_gemm(Tensor a, Tensor b) -> Tensor", tags);
  m.def(
      "int8_linear(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, "
      "Tensor? act_scale=None, Tensor? act_zero_point=None, int act_quant_min=-127, "
      "int act_quant_max=127) -> Tensor",
      tags);
  // observers
  // x is [blocks, elements per block]; hist int64 [blocks, bins] on the
  // canonical grid of range (float64 [blocks, 2]: min and max binned so far).
  m.def("block_minmax(Tensor x) -> (Tensor min, Tensor max, Tensor nonfinite)", tags);
  // In place: the observer's min_val / max_val (float32 [blocks]) and its
  // observed / nonfinite counters (int64 scalars); see update_minmax.
  m.def(
      "minmax_observe(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) observed, "
      "Tensor(d!) nonfinite, float? averaging_constant) -> ()",
      tags);
  // choose_qparams of an observer's min / max: blocks with no finite value get [0, 0], max
  // is raised to min; no host read on CUDA (FakeQuantize's per-step path).
  m.def(
      "observer_qparams(Tensor min, Tensor max, int quant_min, int quant_max, bool symmetric, "
      "float eps) -> (Tensor, Tensor)",
      tags);
  // FakeQuantize's step with a min-max observer in one call: minmax_observe of x as
  // [blocks, elements] (x.movedim(block_axis, 0); blocks = min_val's size) when observe,
  // observer_qparams, then fake_quant of x with the qparams viewed as qparams_shape.
  m.def(
      "minmax_fake_quant(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) observed, "
      "Tensor(d!) nonfinite, float? averaging_constant, int block_axis, SymInt[] qparams_shape, "
      "int quant_min, int quant_max, bool symmetric, float eps, bool observe=True) -> Tensor",
      tags);
  m.def(
      "histogram_observe(Tensor x, Tensor hist, Tensor range, bool absolute) "
      "-> (Tensor hist_out, Tensor range_out, Tensor nonfinite)",
      tags);
  // histogram_observe written in place, with the counters as minmax_observe's (the observers'
  // step: a per-channel histogram can be several times x). A negative count raises; on the CPU,
  // rows of up to 32768 values added before the raise keep the batch.
  m.def(
      "histogram_observe_in_place(Tensor x, Tensor(a!) hist, Tensor(b!) range, "
      "Tensor(c!) observed, Tensor(d!) nonfinite, bool absolute) -> ()",
      tags);
  m.def("histogram_rebin(Tensor hist, Tensor range, Tensor new_range) -> Tensor", tags);
  m.def("histogram_quantile(Tensor hist, Tensor range, float q) -> Tensor", tags);
  m.def(
      "histogram_mse_search(Tensor hist, Tensor range, int quant_min, int quant_max, "
      "bool symmetric, int num_candidates) -> (Tensor min, Tensor max)",
      tags);
  m.def(
      "histogram_entropy_search(Tensor hist, Tensor range, int num_levels) "
      "-> (Tensor min, Tensor max)",
      tags);
  // int8, packed weights. CPU: w_int8 packed once for the kernels; CUDA: an empty tensor (not
  // used). int8_linear_packed without w_int8 runs on the packing alone (Int8Linear on the CPU).
  m.def("int8_pack_weight(Tensor w_int8) -> Tensor", tags);
  m.def("int8_unpack_weight(Tensor w_packed, SymInt N, SymInt K) -> Tensor", tags);
  m.def(
      "int8_linear_packed(Tensor x, Tensor w_packed, Tensor? w_int8, Tensor w_scale, "
      "Tensor? bias, Tensor? act_scale=None, Tensor? act_zero_point=None, "
      "int act_quant_min=-127, int act_quant_max=127) -> Tensor",
      tags);
  // 4-bit weights (block-wise absmax + a 16-value codebook; quant_math.h): packed uint8
  // [N, ceil(K / 2)], absmax float32 [N, ceil(K / block_size)].
  m.def(
      "quantize_4bit(Tensor w, Tensor codebook, int block_size) -> (Tensor packed, Tensor absmax)",
      tags);
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor codebook, SymInt in_features, "
      "int block_size, ScalarType dtype) -> Tensor",
      tags);
  m.def(
      "linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor codebook, int block_size, "
      "Tensor? bias) -> Tensor",
      tags);
}

