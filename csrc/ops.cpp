// Schemas of the isofast_C ops (the primitives of ARCHITECTURE.md) and the
// Python module isofast._C. The CPU kernels register in csrc/cpu/, the CUDA ones in csrc/cuda/.
//
// Seeds and offsets are uint64 values passed as their int64 bit patterns (schema `int`).
// Noise `e` is an explicit (B, n) tensor, or None to generate the contract's draw in-kernel.
// Sampler steps read (seed, offset) from the int64 (2,) tensor `key` (required when e is None,
// ignored otherwise), so that a CUDA graph replays with a new key.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"

TORCH_LIBRARY(isofast_C, m) {
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, Tensor? e, int seed, int offset) "
      "-> Tensor");
  // CPU: q_sample that also returns the eps it drew (float64 for float64 data, float32 otherwise),
  // so the CPU backend can hand it to iso_sums/iso_grad instead of regenerating it (NoiseKey.kept).
  m.def(
      "q_sample_noise(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, int seed, int offset) "
      "-> (Tensor, Tensor)");
  // x0 and coef (5, B): v- and x0-prediction (ARCHITECTURE.md, the primitives); None: eps-prediction.
  m.def("iso_sums(Tensor p, Tensor? e, int seed, int offset, Tensor? x0=None, Tensor? coef=None) -> (Tensor, Tensor)");
  m.def(
      "iso_grad(Tensor p, Tensor? e, int seed, int offset, Tensor c1, Tensor c2, Tensor? x0=None, Tensor? coef=None) "
      "-> Tensor");
  // CPU: the loss's O(B) tail from the sums, (loss, mse, iso, isotropy, k1, k2, d_w) (cpu/iso_loss_tail.cpp);
  // lambdas (G,): G groups of sums (an ensemble's members), one penalty weight each.
  m.def(
      "iso_loss_tail(Tensor sse, Tensor ssq, int n, Tensor? weights, float iso_lambda, str iso_mode, str reduction, "
      "Tensor? lambdas=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ddpm_step(Tensor x, Tensor eps_pred, Tensor t, Tensor table, Tensor? e, Tensor? key, bool clip_x0) -> Tensor");
  m.def(
      "ddim_step(Tensor x, Tensor eps_pred, Tensor t, Tensor t_prev, Tensor table, float eta, Tensor? e, "
      "Tensor? key, bool clip_x0) -> Tensor");
  // The Philox words (int32 (ceil(N/4), 4); a debug op for the tests) and the normals (float32 (N,);
  // also the CPU backend's materialised draw) of the draw (seed, offset) of N = like.numel()
  // elements, on like's device. scalar=True uses philox.h's libm Box-Muller on the CPU instead of
  // the vectorised generator of the kernels.
  m.def("philox_bits(Tensor like, int seed, int offset) -> Tensor");
  m.def("philox_randn(Tensor like, int seed, int offset, bool scalar=False) -> Tensor");
  // CPU: row m is philox_randn's draw (seeds[m], offsets[m]) of n elements (the ensemble's members' noise).
  m.def("philox_randn_rows(Tensor seeds, Tensor offsets, int n) -> Tensor");
  // CPU: the stacked ensemble's forward with one timestep per member, its time terms folded into the biases:
  // h <- relu(h weights[l]^T + biases[l]), no ReLU after the last layer (cpu/ensemble_mlp.cpp; sampling); weights
  // as nn.Linear's, (M, out, in).
  m.def("ensemble_mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor");
  // CPU: the stacked TimeMLP's training forward (hidden layer l: relu(h weights[l]^T + biases[l] + emb projs[l]^T);
  // returns the output and the hidden activations) and its parameters' gradients, one task per member.
  m.def(
      "ensemble_mlp_train_forward(Tensor x, Tensor emb, Tensor[] weights, Tensor[] projs, Tensor[] biases, "
      "Tensor out_weight, Tensor out_bias) -> (Tensor, Tensor[])");
  m.def(
      "ensemble_mlp_train_backward(Tensor grad, Tensor x, Tensor emb, Tensor[] hidden, Tensor[] weights, "
      "Tensor[] projs, Tensor[] biases, Tensor out_weight) -> (Tensor[], Tensor[], Tensor[], Tensor, Tensor)");
  // CPU: the stacked TimeMLP's whole training forward and backward, one task per member: q_sample, the network,
  // the Iso-Diffusion loss (mode "batch", mean, lambdas[m]) and the gradients of the members' summed losses;
  // returns (loss (M,), the gradients as the backward above, their per-member norms (M, P) when norm_lanes > 0).
  m.def(
      "ensemble_mlp_train_step(Tensor x0, Tensor eps, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, Tensor emb_table, "
      "Tensor lambdas, Tensor[] weights, Tensor[] projs, Tensor[] biases, Tensor out_weight, Tensor out_bias, "
      "int norm_lanes=0) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor, Tensor, Tensor)");
  // CPU: (M, k) float32, the 2-norm of each grads[i][m] as torch.linalg.vector_norm sums it with `lanes` lanes, for
  // per-member lengths that are multiples of lanes (cpu/clip_norms.cpp: the ensemble's clipping norms).
  m.def("member_grad_norms(Tensor[] grads, int lanes) -> Tensor");
  // CPU: the stacked ensemble's Adam in one pass (cpu/adam.cpp; torch's own sqrt on each chunk).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] ema, Tensor? scale, float beta1, float beta2, float step_size, float bc2_sqrt, float eps, "
      "float ema_weight) -> ()");
}

namespace {

bool has_cuda() {
#ifdef ISOFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PyObject* py_has_cuda(PyObject*, PyObject*) { return PyBool_FromLong(has_cuda() ? 1 : 0); }

PyObject* py_noise_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isofast::cpu::noise_isa()); }

PyObject* py_sampler_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isofast::cpu::sampler_isa()); }

PyMethodDef kMethods[] = {
    {"has_cuda", py_has_cuda, METH_NOARGS, "True when isofast._C was built with its CUDA kernels."},
    {"noise_isa", py_noise_isa, METH_NOARGS, "The instruction set of the CPU noise generator on this machine."},
    {"sampler_isa", py_sampler_isa, METH_NOARGS,
     "How the 2-D ensemble's sampling forward runs its layers on this CPU (AVX-512 or sgemm)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "isofast compiled kernels; the ops live in torch.ops.isofast_C.", -1, kMethods};

}  // namespace

// Importing isofast._C loads this library, which registers the ops with the dispatcher.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
