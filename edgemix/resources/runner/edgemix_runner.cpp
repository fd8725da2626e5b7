// edgemix_runner: runs an ExecuTorch program (.pte, or a BundledProgram .bpte) on raw float32
// inputs through the Module API, the same API an Android/iOS app links, and reports outputs and
// per-run timings. One source for every target: the host (x86-64), arm64 Linux (cross-compiled,
// run natively on a Jetson's CPU or under qemu-user) and Android (NDK). Build instructions:
// docs/native-runner.md; edgemix/native.py builds and caches it.
//
//   edgemix_runner MODEL [--input FILE [--shape N,C,H,W]] [--output FILE] [--threads T]
//                        [--warmup W] [--iterations I] [--method NAME]
//                        [--atol A] [--rtol R] [--bundled-output FILE] [--no-bundled]
//   edgemix_runner --selftest
//
// Input file: N samples of the method's per-sample input shape (the input's sizes without the
// batch dimension), little-endian float32, no header. The program's batch size is fixed at
// export, so the samples are fed in batches of that size; the last batch is zero-padded and the
// padded rows' outputs are dropped. Output file: N samples of output 0, float32.
//
// --selftest checks the CPU's int8/fp32 matrix instructions against their definitions (an
// emulator can get them wrong; see "ISA self-test" below).
//
// stdout carries one JSON object per line (events "load", "run", "summary", "bundled_case",
// "bundled_summary", "selftest"); ExecuTorch's own log goes to stderr. Exit codes: 0 ok, 1 a
// bundled test case outside the tolerance or a failed self-test, 2 bad usage or input, 3 the
// program could not be loaded or run.

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

// The wheels ship libexecutorch_threadpool.so but not its header (only threadpool_guard.h), so
// the two entry points needed to size the pool are declared here exactly as upstream's
// extension/threadpool/threadpool.h declares them. Only these non-virtual members are called
// through a pointer the library returns, so the class layout does not matter to this file.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::BufferDataLoader;
using executorch::extension::from_blob;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

constexpr int kExitOk = 0;
constexpr int kExitMismatch = 1;
constexpr int kExitUsage = 2;
constexpr int kExitRuntime = 3;

struct Failure : std::runtime_error {
  int code;
  Failure(int c, const std::string& m) : std::runtime_error(m), code(c) {}
};

[[noreturn]] void fail(int code, const std::string& msg) { throw Failure(code, msg); }

void check(Error err, const std::string& what) {
  if (err != Error::Ok) {
    fail(kExitRuntime, what + " failed (executorch error " + std::to_string(static_cast<int>(err)) + ")");
  }
}

// ---- JSON output (only numbers, bools, plain strings and lists of them are written) ----------

std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string json_num(double v) {
  if (!std::isfinite(v)) return "null";  // JSON has no NaN/inf
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

template <typename T>
std::string json_list(const std::vector<T>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + json_num(static_cast<double>(v[i]));
  return out + "]";
}

void emit(const std::string& body) {
  std::fprintf(stdout, "{%s}\n", body.c_str());
  std::fflush(stdout);  // a caller reading a pipe sees progress, and a crash keeps earlier lines
}

// ---- files -----------------------------------------------------------------------------------

// A whole file in a 64-byte-aligned buffer: a BundledProgram force-aligns the embedded program to
// 32 bytes relative to the file start, and the runtime expects that alignment to survive.
struct AlignedFile {
  std::unique_ptr<uint8_t, decltype(&std::free)> data{nullptr, &std::free};
  size_t size = 0;
};

AlignedFile read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) fail(kExitUsage, "cannot open " + path);
  AlignedFile out;
  out.size = static_cast<size_t>(f.tellg());
  // posix_memalign, not std::aligned_alloc: Android's bionic has the latter only from API 28.
  void* mem = nullptr;
  if (posix_memalign(&mem, 64, out.size + 64) != 0) fail(kExitRuntime, "out of memory reading " + path);
  out.data.reset(static_cast<uint8_t*>(mem));
  f.seekg(0);
  if (!f.read(reinterpret_cast<char*>(out.data.get()), static_cast<std::streamsize>(out.size))) {
    fail(kExitUsage, "cannot read " + path);
  }
  return out;
}

void write_floats(const std::string& path, const std::vector<float>& v) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
  if (!f) fail(kExitUsage, "cannot write " + path);
}

// ---- BundledProgram reader -------------------------------------------------------------------
// The wheels ship neither the bundled-program runtime library nor flatbuffers headers (the
// runtime part only lives inside the Python extension), so the few tables this runner needs are
// read here directly from the FlatBuffers wire format, with every offset bounds-checked. Schema:
// executorch/devtools/bundled_program/schema/bundled_program_schema.fbs (file identifier BP08).

class FlatBuffer {
 public:
  FlatBuffer(const uint8_t* base, size_t size) : base_(base), size_(size) {}

  template <typename T>
  T scalar(size_t pos) const {
    need(pos, sizeof(T));
    T v;
    std::memcpy(&v, base_ + pos, sizeof(T));
    return v;
  }
  size_t root() const { return scalar<uint32_t>(0); }
  // Position of field `id` inside the table at `table`, or 0 when the field is absent.
  size_t field(size_t table, int id) const {
    size_t vtable = table - static_cast<size_t>(static_cast<int64_t>(scalar<int32_t>(table)));
    uint16_t vsize = scalar<uint16_t>(vtable);
    size_t entry = 4 + 2 * static_cast<size_t>(id);
    if (entry + 2 > vsize) return 0;
    uint16_t off = scalar<uint16_t>(vtable + entry);
    return off ? table + off : 0;
  }
  // Follows the uoffset stored at `pos` (tables, vectors, strings are stored by reference).
  size_t deref(size_t pos) const { return pos + scalar<uint32_t>(pos); }
  size_t table_field(size_t table, int id) const {
    size_t f = field(table, id);
    return f ? deref(f) : 0;
  }
  // A vector field: (position of the first element, element count); count 0 when absent.
  std::pair<size_t, size_t> vector(size_t table, int id, size_t elem_size) const {
    size_t f = field(table, id);
    if (!f) return {0, 0};
    size_t v = deref(f);
    size_t n = scalar<uint32_t>(v);
    need(v + 4, n * elem_size);
    return {v + 4, n};
  }
  std::string string(size_t table, int id) const {
    auto [pos, n] = vector(table, id, 1);
    return n ? std::string(reinterpret_cast<const char*>(base_ + pos), n) : std::string();
  }
  const uint8_t* at(size_t pos) const { return base_ + pos; }

 private:
  void need(size_t pos, size_t n) const {
    if (pos > size_ || n > size_ - pos) fail(kExitUsage, "corrupt bundled program (offset out of range)");
  }
  const uint8_t* base_;
  size_t size_;
};

struct BundledTensor {
  ScalarType type;
  std::vector<int32_t> sizes;
  std::vector<uint8_t> bytes;  // an owned, aligned-enough copy: from_blob needs mutable memory
};

struct BundledCase {
  std::vector<BundledTensor> inputs, expected;
};

struct BundledSuite {
  std::string method;
  std::vector<BundledCase> cases;
};

struct Bundled {
  const uint8_t* program = nullptr;
  size_t program_size = 0;
  std::vector<BundledSuite> suites;
};

// Field ids follow the declaration order in the schema.
enum { kBP_version = 0, kBP_suites = 1, kBP_program = 2 };
enum { kSuite_method = 0, kSuite_cases = 1 };
enum { kCase_inputs = 0, kCase_expected = 1 };
enum { kValue_type = 0, kValue_val = 1 };
enum { kTensor_type = 0, kTensor_sizes = 1, kTensor_data = 2, kTensor_dim_order = 3 };
constexpr uint8_t kUnionTensor = 1;  // ValueUnion { Tensor, Int, Bool, Double }, NONE = 0

std::vector<BundledTensor> read_values(const FlatBuffer& fb, size_t table, int id) {
  std::vector<BundledTensor> out;
  auto [pos, n] = fb.vector(table, id, 4);
  for (size_t i = 0; i < n; ++i) {
    size_t value = fb.deref(pos + 4 * i);
    size_t tf = fb.field(value, kValue_type);
    uint8_t kind = tf ? fb.scalar<uint8_t>(tf) : 0;
    if (kind != kUnionTensor) {
      fail(kExitUsage, "bundled test case holds a non-tensor value; this runner feeds tensors only");
    }
    size_t t = fb.table_field(value, kValue_val);
    BundledTensor bt;
    size_t st = fb.field(t, kTensor_type);
    bt.type = static_cast<ScalarType>(st ? fb.scalar<int8_t>(st) : 0);
    auto [spos, sn] = fb.vector(t, kTensor_sizes, 4);
    for (size_t k = 0; k < sn; ++k) bt.sizes.push_back(fb.scalar<int32_t>(spos + 4 * k));
    auto [dpos, dn] = fb.vector(t, kTensor_data, 1);
    bt.bytes.assign(fb.at(dpos), fb.at(dpos) + dn);
    auto [opos, on] = fb.vector(t, kTensor_dim_order, 1);
    for (size_t k = 0; k < on; ++k) {
      if (fb.scalar<uint8_t>(opos + k) != k) {
        fail(kExitUsage, "bundled tensor is not contiguous (dim_order); this runner handles contiguous tensors");
      }
    }
    out.push_back(std::move(bt));
  }
  return out;
}

Bundled read_bundled(const AlignedFile& f) {
  FlatBuffer fb(f.data.get(), f.size);
  size_t root = fb.root();
  Bundled b;
  auto [ppos, pn] = fb.vector(root, kBP_program, 1);
  if (!pn) fail(kExitUsage, "bundled program carries no program");
  b.program = fb.at(ppos);
  b.program_size = pn;
  auto [spos, sn] = fb.vector(root, kBP_suites, 4);
  for (size_t i = 0; i < sn; ++i) {
    size_t suite = fb.deref(spos + 4 * i);
    BundledSuite s;
    s.method = fb.string(suite, kSuite_method);
    auto [cpos, cn] = fb.vector(suite, kSuite_cases, 4);
    for (size_t c = 0; c < cn; ++c) {
      size_t tc = fb.deref(cpos + 4 * c);
      s.cases.push_back({read_values(fb, tc, kCase_inputs), read_values(fb, tc, kCase_expected)});
    }
    b.suites.push_back(std::move(s));
  }
  return b;
}

// ---- helpers ---------------------------------------------------------------------------------

struct Options {
  std::string model, input, output, bundled_output, method = "forward";
  std::vector<long> shape;
  int threads = 0, warmup = 0, iterations = 1;
  double atol = 1e-3, rtol = 1e-3;
  bool run_bundled = true;
  bool selftest = false;
};

void usage_exit(const std::string& msg) {
  std::fprintf(stderr,
               "%s\nusage: edgemix_runner MODEL.pte|MODEL.bpte [--input F --shape N,C,H,W] [--output F]\n"
               "       [--threads T] [--warmup W] [--iterations I] [--method NAME]\n"
               "       [--atol A] [--rtol R] [--bundled-output F] [--no-bundled]\n"
               "       edgemix_runner --selftest   (checks the CPU's int8/fp32 matrix instructions)\n",
               msg.c_str());
  std::exit(kExitUsage);
}

long to_long(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end) usage_exit(flag + " expects an integer, got '" + s + "'");
  return v;
}

double to_double(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end) usage_exit(flag + " expects a number, got '" + s + "'");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_exit(a + " needs a value");
      return argv[++i];
    };
    if (a == "--input") o.input = value();
    else if (a == "--output") o.output = value();
    else if (a == "--bundled-output") o.bundled_output = value();
    else if (a == "--method") o.method = value();
    else if (a == "--threads") o.threads = static_cast<int>(to_long(a, value()));
    else if (a == "--warmup") o.warmup = static_cast<int>(to_long(a, value()));
    else if (a == "--iterations") o.iterations = static_cast<int>(to_long(a, value()));
    else if (a == "--atol") o.atol = to_double(a, value());
    else if (a == "--rtol") o.rtol = to_double(a, value());
    else if (a == "--no-bundled") o.run_bundled = false;
    else if (a == "--selftest") o.selftest = true;
    else if (a == "--shape") {
      std::stringstream ss(value());
      std::string part;
      while (std::getline(ss, part, ',')) o.shape.push_back(to_long("--shape", part));
    } else if (a == "-h" || a == "--help") usage_exit("edgemix_runner: run an ExecuTorch program");
    else if (!a.empty() && a[0] == '-') usage_exit("unknown option " + a);
    else if (o.model.empty()) o.model = a;
    else usage_exit("more than one model given: " + o.model + ", " + a);
  }
  if (o.model.empty() && !o.selftest) usage_exit("no model given");
  if (o.threads < 0 || o.warmup < 0 || o.iterations < 1) {
    usage_exit("--threads and --warmup must be >= 0 and --iterations >= 1");
  }
  if (!o.output.empty() && o.input.empty()) usage_exit("--output needs --input");
  return o;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

const char* arch_name() {
#if defined(__aarch64__)
  return "aarch64";
#elif defined(__x86_64__)
  return "x86_64";
#elif defined(__arm__)
  return "arm";
#else
  return "unknown";
#endif
}

// The CPU features the kernels could see. On arm64 XNNPACK picks its int8 GEMM microkernels from
// these (NEON, dotprod, i8mm, SME), so a result is only meaningful together with this line.
std::string cpu_features_json() {
#if defined(__aarch64__) && defined(__linux__)
  unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  // Bit positions from the Linux arm64 ABI (arch/arm64/include/uapi/asm/hwcap.h); spelled out so
  // that older cross-compiler headers still build this file.
  struct Bit { const char* name; unsigned long word; int bit; } bits[] = {
      {"asimd", hw, 1},   {"fphp", hw, 9},    {"asimddp", hw, 20}, {"sve", hw, 22},
      {"sve2", hw2, 1},   {"i8mm", hw2, 13},  {"bf16", hw2, 14},   {"sme", hw2, 23},
      {"sme_i8i32", hw2, 26}, {"sme2", hw2, 37},
  };
  std::string names;
  for (auto& b : bits) {
    if (b.word >> b.bit & 1UL) names += std::string(names.empty() ? "" : ",") + json_str(b.name);
  }
  char buf[96];
  std::snprintf(buf, sizeof buf, "\"hwcap\":\"0x%lx\",\"hwcap2\":\"0x%lx\",", hw, hw2);
  return std::string(buf) + "\"cpu_features\":[" + names + "]";
#else
  return "\"cpu_features\":[]";
#endif
}

// ---- ISA self-test ---------------------------------------------------------------------------
// An emulator can be wrong about an instruction. Debian 12's qemu 7.2 computes SME's 32-bit SMOPA
// (int8 outer product into int32 tiles) wrongly: it writes two results per 64-bit chunk pairwise
// instead of the full outer product, which is exactly the instruction XNNPACK's int8 SME kernels
// are built on (docs/native-runner.md, "Why arm64 -cpu max diverges"). So before trusting a CPU
// profile, the runner executes each int8/fp32 matrix instruction XNNPACK may pick on it once,
// on fixed data covering the whole int8 range, and compares with the Arm ARM definition computed
// in plain C++. Instructions the CPU does not advertise are reported, not executed.

#if defined(__aarch64__) && defined(__linux__) && !defined(EDGEMIX_NO_ISA_SELFTEST)

struct Check {
  std::string name, status;
  size_t mismatches = 0, elements = 0;
};

// Deterministic int8 data with both extremes (-128, 127) present.
std::vector<int8_t> test_bytes(size_t n, uint32_t seed) {
  std::vector<int8_t> v(n);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    v[i] = static_cast<int8_t>(seed >> 24);
  }
  if (n > 1) v[0] = -128, v[1] = 127;
  return v;
}

// Every dotprod/i8mm/SME instruction is emitted as its encoding (`.inst`, the mnemonic beside it):
// assemblers disagree on how to enable them (binutils 2.40 refuses `.arch_extension dotprod` on
// GCC's armv8-a base, clang 14 knows no `.arch_extension sme`), and raising the base architecture
// for the whole file would let the compiler use them in its own code. Encoded instructions name
// fixed registers, so operands are moved into x8-x11 first.
Check check_sdot() {  // SDOT: acc[i] += sum_k a[4i+k] * b[4i+k]  (dotprod, Armv8.2)
  Check c{"sdot_s8", "ok"};
  for (uint32_t t = 0; t < 64; ++t) {
    auto a = test_bytes(16, 2 * t + 1), b = test_bytes(16, 2 * t + 2);
    int32_t got[4];
    asm volatile(
        "ld1 {v1.16b}, [%[a]]\n ld1 {v2.16b}, [%[b]]\n movi v0.4s, #0\n"
        ".inst 0x4e829420\n"  // sdot v0.4s, v1.16b, v2.16b
        "st1 {v0.4s}, [%[o]]\n"
        : : [a] "r"(a.data()), [b] "r"(b.data()), [o] "r"(got) : "v0", "v1", "v2", "memory");
    for (int i = 0; i < 4; ++i) {
      int32_t ref = 0;
      for (int k = 0; k < 4; ++k) ref += a[4 * i + k] * b[4 * i + k];
      c.mismatches += got[i] != ref;
      ++c.elements;
    }
  }
  return c;
}

Check check_smmla() {  // SMMLA: 2x8 by 8x2 int8 -> 2x2 int32, C[i][j] += sum_k A[i][k] * B[j][k]  (i8mm)
  Check c{"smmla_s8", "ok"};
  for (uint32_t t = 0; t < 64; ++t) {
    auto a = test_bytes(16, 2 * t + 101), b = test_bytes(16, 2 * t + 102);
    int32_t got[4];
    asm volatile(
        "ld1 {v1.16b}, [%[a]]\n ld1 {v2.16b}, [%[b]]\n movi v0.4s, #0\n"
        ".inst 0x4e82a420\n"  // smmla v0.4s, v1.16b, v2.16b
        "st1 {v0.4s}, [%[o]]\n"
        : : [a] "r"(a.data()), [b] "r"(b.data()), [o] "r"(got) : "v0", "v1", "v2", "memory");
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        int32_t ref = 0;
        for (int k = 0; k < 8; ++k) ref += a[8 * i + k] * b[8 * j + k];
        c.mismatches += got[2 * i + j] != ref;
        ++c.elements;
      }
    }
  }
  return c;
}

// SMSTART/SMSTOP zero every vector register, hence the full clobber list (GCC then saves the
// callee-saved d8-d15 around the block). Everything between them stays in one asm statement
// because compiled code may use instructions that are illegal in streaming mode.
#define EDGEMIX_ALL_V                                                                                  \
  "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v13", "v14", "v15", \
      "v16", "v17", "v18", "v19", "v20", "v21", "v22", "v23", "v24", "v25", "v26", "v27", "v28", "v29",  \
      "v30", "v31"

uint64_t streaming_vector_bytes() {
  uint64_t svl;
  asm volatile(".inst 0x04bf5829\n mov %0, x9\n" : "=r"(svl) : : "x9");  // rdsvl x9, #1
  return svl;
}

// One SME outer product into ZA0.S and a store of its n rows: x8 = Zn source, x9 = Zm source,
// x10 = destination, x11 = row count; `load` loads z0/z1, `mopa` is the instruction under test.
#define EDGEMIX_SME_TILE(load0, load1, mopa)                                                       \
  "mov x8, %[a]\n mov x9, %[b]\n mov x10, %[d]\n mov x11, %[n]\n"                                \
  ".inst 0xd503477f\n" /* smstart */                                                            \
  ".inst 0x2518e3e0\n" /* ptrue p0.b */                                                         \
  ".inst 0x2598e3e1\n" /* ptrue p1.s */                                                         \
  load0 load1                                                                                    \
  ".inst 0xc00800ff\n" /* zero {za} */                                                          \
  mopa                                                                                           \
  "mov w12, #0\n"                                                                                \
  "1: .inst 0xe0bf0540\n" /* st1w {za0h.s[w12, 0]}, p1, [x10] */                                \
  ".inst 0x042a582a\n"    /* addsvl x10, x10, #1 */                                             \
  "add w12, w12, #1\n cmp x12, x11\n b.lt 1b\n"                                                 \
  ".inst 0xd503467f\n" /* smstop */

Check check_smopa() {  // SMOPA (4-way): ZA0.S[i][j] += sum_k Zn.B[4i+k] * Zm.B[4j+k]  (SME)
  Check c{"smopa_s8_s32", "ok"};
  const uint64_t svl = streaming_vector_bytes(), n = svl / 4;
  auto a = test_bytes(svl, 7), b = test_bytes(svl, 8);
  std::vector<int32_t> tile(n * n, 0x5a5a5a5a);
  int32_t* dst = tile.data();
  asm volatile(EDGEMIX_SME_TILE(".inst 0xa400a100\n",  // ld1b {z0.b}, p0/z, [x8]
                                 ".inst 0xa400a121\n",  // ld1b {z1.b}, p0/z, [x9]
                                 ".inst 0xa0810000\n")  // smopa za0.s, p0/m, p0/m, z0.b, z1.b
               : : [a] "r"(a.data()), [b] "r"(b.data()), [d] "r"(dst), [n] "r"(n)
               : "x8", "x9", "x10", "x11", "x12", "cc", "memory", EDGEMIX_ALL_V);
  for (uint64_t i = 0; i < n; ++i) {
    for (uint64_t j = 0; j < n; ++j) {
      int32_t ref = 0;
      for (int k = 0; k < 4; ++k) ref += a[4 * i + k] * b[4 * j + k];
      c.mismatches += tile[i * n + j] != ref;
      ++c.elements;
    }
  }
  return c;
}

Check check_fmopa() {  // FMOPA: ZA0.S[i][j] += Zn.S[i] * Zm.S[j]  (SME, fp32)
  Check c{"fmopa_f32", "ok"};
  const uint64_t svl = streaming_vector_bytes(), n = svl / 4;
  auto ab = test_bytes(2 * n, 9);
  // Small integers: every product is exact in float, so the reference is exact too.
  std::vector<float> a(ab.begin(), ab.begin() + n), b(ab.begin() + n, ab.end()), tile(n * n, -1.0f);
  float* dst = tile.data();
  asm volatile(EDGEMIX_SME_TILE(".inst 0xa540a100\n",  // ld1w {z0.s}, p0/z, [x8]  (p0.b is all-true)
                                 ".inst 0xa540a121\n",  // ld1w {z1.s}, p0/z, [x9]
                                 ".inst 0x80810000\n")  // fmopa za0.s, p0/m, p0/m, z0.s, z1.s
               : : [a] "r"(a.data()), [b] "r"(b.data()), [d] "r"(dst), [n] "r"(n)
               : "x8", "x9", "x10", "x11", "x12", "cc", "memory", EDGEMIX_ALL_V);
  for (uint64_t i = 0; i < n; ++i) {
    for (uint64_t j = 0; j < n; ++j) {
      c.mismatches += tile[i * n + j] != a[i] * b[j];
      ++c.elements;
    }
  }
  return c;
}

std::vector<Check> isa_checks(std::string& extra) {
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  std::vector<Check> out;
  auto run_if = [&](bool advertised, const char* name, Check (*fn)()) {
    out.push_back(advertised ? fn() : Check{name, "not_advertised"});
    if (out.back().mismatches) out.back().status = "wrong";
  };
  run_if(hw >> 20 & 1, "sdot_s8", check_sdot);
  run_if(hw2 >> 13 & 1, "smmla_s8", check_smmla);
  const bool sme = hw2 >> 23 & 1;
  run_if(sme, "smopa_s8_s32", check_smopa);
  run_if(sme, "fmopa_f32", check_fmopa);
  if (sme) extra = ",\"streaming_vector_bytes\":" + std::to_string(streaming_vector_bytes());
  return out;
}

#else

struct Check {
  std::string name, status;
  size_t mismatches = 0, elements = 0;
};
// x86-64 kernels use no instruction an emulator is asked to get right here (the host runs them).
std::vector<Check> isa_checks(std::string&) { return {}; }

#endif

int selftest() {
  std::string extra;
  auto checks = isa_checks(extra);
  bool pass = true;
  std::string list = "[";
  for (size_t i = 0; i < checks.size(); ++i) {
    const auto& c = checks[i];
    pass = pass && c.status != "wrong";
    list += std::string(i ? "," : "") + "{\"name\":" + json_str(c.name) + ",\"status\":" + json_str(c.status) +
            ",\"mismatches\":" + std::to_string(c.mismatches) + ",\"elements\":" + std::to_string(c.elements) + "}";
  }
  emit("\"event\":\"selftest\",\"arch\":" + json_str(arch_name()) + "," + cpu_features_json() + extra +
       ",\"checks\":" + list + "],\"pass\":" + (pass ? "true" : "false"));
  return pass ? kExitOk : kExitMismatch;
}

size_t numel(const std::vector<int32_t>& sizes) {
  size_t n = 1;
  for (auto s : sizes) n *= static_cast<size_t>(s);
  return n;
}

template <typename T>
std::vector<int32_t> to_vec(const T& span) {
  return std::vector<int32_t>(span.begin(), span.end());
}

// Outputs of one execution as float32, copied out of the method's memory (the next execute
// overwrites it).
std::vector<std::vector<float>> float_outputs(const std::vector<EValue>& outs) {
  std::vector<std::vector<float>> res;
  for (const auto& ev : outs) {
    if (!ev.isTensor()) fail(kExitRuntime, "the method returned a non-tensor output");
    const auto& t = ev.toTensor();
    if (t.scalar_type() != ScalarType::Float) fail(kExitRuntime, "the method returned a non-float32 output");
    const float* p = t.const_data_ptr<float>();
    res.emplace_back(p, p + t.numel());
  }
  return res;
}

struct Stats {
  double max_abs = 0, max_rel = 0, cosine = 0;
  bool within = true, argmax_equal = true;
};

// The same closeness rule as torch.allclose (|a - e| <= atol + rtol * |e|), plus the figures that
// explain a failure: max errors, cosine, and whether each row's arg-max (the class) agrees.
Stats compare(const std::vector<float>& a, const std::vector<float>& e, size_t row) {
  Stats s;
  double dot = 0, na = 0, ne = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double d = std::fabs(static_cast<double>(a[i]) - e[i]);
    s.max_abs = std::max(s.max_abs, d);
    if (e[i] != 0) s.max_rel = std::max(s.max_rel, d / std::fabs(static_cast<double>(e[i])));
    dot += static_cast<double>(a[i]) * e[i];
    na += static_cast<double>(a[i]) * a[i];
    ne += static_cast<double>(e[i]) * e[i];
  }
  s.cosine = (na > 0 && ne > 0) ? dot / std::sqrt(na * ne) : (na == ne ? 1.0 : 0.0);
  if (row) {
    for (size_t r = 0; r + row <= a.size(); r += row) {
      auto ia = std::max_element(a.begin() + r, a.begin() + r + row) - a.begin();
      auto ie = std::max_element(e.begin() + r, e.begin() + r + row) - e.begin();
      if (ia != ie) s.argmax_equal = false;
    }
  }
  return s;
}

std::vector<EValue> execute(Module& m, const std::string& method, const std::vector<EValue>& in) {
  auto r = m.execute(method, in);
  if (!r.ok()) check(r.error(), "executing method '" + method + "'");
  return std::move(*r);
}

// ---- the two modes ---------------------------------------------------------------------------

int run_bundled_cases(Module& module, const Bundled& b, const Options& o) {
  std::vector<float> all_out;
  size_t failed = 0, total = 0;
  for (const auto& suite : b.suites) {
    for (size_t c = 0; c < suite.cases.size(); ++c) {
      const auto& tc = suite.cases[c];
      std::vector<BundledTensor> inputs = tc.inputs;  // mutable copies for from_blob
      std::vector<TensorPtr> keep;
      std::vector<EValue> evs;
      for (auto& t : inputs) {
        keep.push_back(from_blob(t.bytes.data(), t.sizes, t.type));
        evs.emplace_back(keep.back());
      }
      for (int w = 0; w < o.warmup; ++w) execute(module, suite.method, evs);
      auto t0 = std::chrono::steady_clock::now();
      auto outs = float_outputs(execute(module, suite.method, evs));
      double ms = ms_since(t0);
      if (outs.size() != tc.expected.size()) fail(kExitRuntime, "bundled case output count differs from expected");
      std::string per_out = "[";
      bool ok = true;
      for (size_t k = 0; k < outs.size(); ++k) {
        const auto& e = tc.expected[k];
        if (e.type != ScalarType::Float) fail(kExitUsage, "bundled expected output is not float32");
        std::vector<float> ev(e.bytes.size() / sizeof(float));
        std::memcpy(ev.data(), e.bytes.data(), ev.size() * sizeof(float));
        if (ev.size() != outs[k].size()) fail(kExitRuntime, "bundled case output size differs from expected");
        size_t row = e.sizes.empty() ? 0 : static_cast<size_t>(e.sizes.back());
        Stats s = compare(outs[k], ev, row);
        for (size_t i = 0; i < ev.size(); ++i) {
          if (!(std::fabs(outs[k][i] - ev[i]) <= o.atol + o.rtol * std::fabs(ev[i]))) s.within = false;
        }
        ok = ok && s.within;
        per_out += std::string(k ? "," : "") + "{\"max_abs\":" + json_num(s.max_abs) + ",\"max_rel\":" +
                   json_num(s.max_rel) + ",\"cosine\":" + json_num(s.cosine) + ",\"argmax_equal\":" +
                   (s.argmax_equal ? "true" : "false") + ",\"within_tolerance\":" + (s.within ? "true" : "false") + "}";
        if (k == 0) all_out.insert(all_out.end(), outs[0].begin(), outs[0].end());
      }
      per_out += "]";
      ++total;
      if (!ok) ++failed;
      emit("\"event\":\"bundled_case\",\"method\":" + json_str(suite.method) + ",\"case\":" + std::to_string(c) +
           ",\"ms\":" + json_num(ms) + ",\"pass\":" + (ok ? "true" : "false") + ",\"outputs\":" + per_out);
    }
  }
  if (!o.bundled_output.empty()) write_floats(o.bundled_output, all_out);
  emit("\"event\":\"bundled_summary\",\"cases\":" + std::to_string(total) + ",\"failed\":" + std::to_string(failed) +
       ",\"atol\":" + json_num(o.atol) + ",\"rtol\":" + json_num(o.rtol));
  return failed ? kExitMismatch : kExitOk;
}

void run_input_file(Module& module, const Options& o, const std::vector<int32_t>& in_sizes,
                    const std::vector<int32_t>& out_sizes) {
  if (in_sizes.empty() || out_sizes.empty()) fail(kExitUsage, "the method's input and output need a batch dimension");
  const size_t batch = static_cast<size_t>(in_sizes[0]);
  const size_t per_in = numel(in_sizes) / batch, per_out = numel(out_sizes) / batch;
  AlignedFile f = read_file(o.input);
  if (f.size % (per_in * sizeof(float))) {
    fail(kExitUsage, o.input + " holds " + std::to_string(f.size) + " bytes, not a whole number of float32 samples of " +
                         std::to_string(per_in) + " values");
  }
  const size_t n = f.size / (per_in * sizeof(float));
  if (!o.shape.empty()) {
    // The shape is optional and only checked: the program fixes everything but N.
    size_t given = 1;
    for (size_t i = 1; i < o.shape.size(); ++i) given *= static_cast<size_t>(o.shape[i]);
    if (static_cast<size_t>(o.shape[0]) != n || given != per_in || o.shape.size() != in_sizes.size()) {
      fail(kExitUsage, "--shape does not match the input file and the program's input " + json_list(in_sizes));
    }
  }
  const float* src = reinterpret_cast<const float*>(f.data.get());
  std::vector<float> buf(batch * per_in), outputs;
  outputs.reserve(n * per_out);
  std::vector<double> timed;
  bool repeatable = true;
  size_t batches = (n + batch - 1) / batch;
  for (size_t b = 0; b < batches; ++b) {
    size_t rows = std::min(batch, n - b * batch);
    std::fill(buf.begin(), buf.end(), 0.0f);
    std::memcpy(buf.data(), src + b * batch * per_in, rows * per_in * sizeof(float));
    auto tensor = from_blob(buf.data(), in_sizes, ScalarType::Float);
    std::vector<EValue> in{EValue(tensor)};
    std::vector<float> first;
    for (int it = -o.warmup; it < o.iterations; ++it) {
      auto t0 = std::chrono::steady_clock::now();
      auto outs = execute(module, o.method, in);
      double ms = ms_since(t0);
      auto fo = float_outputs(outs);
      if (it < 0) {
        emit("\"event\":\"run\",\"batch\":" + std::to_string(b) + ",\"images\":" + std::to_string(rows) +
             ",\"warmup\":true,\"iteration\":" + std::to_string(it + o.warmup) + ",\"ms\":" + json_num(ms));
        continue;
      }
      timed.push_back(ms);
      emit("\"event\":\"run\",\"batch\":" + std::to_string(b) + ",\"images\":" + std::to_string(rows) +
           ",\"warmup\":false,\"iteration\":" + std::to_string(it) + ",\"ms\":" + json_num(ms));
      // Every iteration of a batch must give the same bits; a kernel that does not (a race, an
      // uninitialised accumulator) shows up here instead of as noise in a drift figure.
      if (it == 0) first = fo[0];
      else if (std::memcmp(first.data(), fo[0].data(), first.size() * sizeof(float)) != 0) repeatable = false;
    }
    outputs.insert(outputs.end(), first.begin(), first.begin() + rows * per_out);
  }
  if (!o.output.empty()) write_floats(o.output, outputs);
  std::vector<double> sorted = timed;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double t : timed) sum += t;
  double median = sorted.empty() ? 0 : (sorted.size() % 2 ? sorted[sorted.size() / 2]
                                                          : 0.5 * (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]));
  emit("\"event\":\"summary\",\"images\":" + std::to_string(n) + ",\"batches\":" + std::to_string(batches) +
       ",\"batch_size\":" + std::to_string(batch) + ",\"timed_runs\":" + std::to_string(timed.size()) +
       ",\"median_ms\":" + json_num(median) + ",\"mean_ms\":" + json_num(timed.empty() ? 0 : sum / timed.size()) +
       ",\"min_ms\":" + json_num(sorted.empty() ? 0 : sorted.front()) +
       ",\"max_ms\":" + json_num(sorted.empty() ? 0 : sorted.back()) +
       ",\"median_ms_per_image\":" + json_num(median / batch) + ",\"repeatable\":" + (repeatable ? "true" : "false") +
       ",\"output_values_per_image\":" + std::to_string(per_out));
}

int run(const Options& o) {
  executorch::runtime::runtime_init();
  // XNNPACK takes the pool when a method is loaded (it creates its runtime then), so the pool is
  // sized before load_method and never touched afterwards.
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (o.threads > 0 && pool && !pool->_unsafe_reset_threadpool(static_cast<uint32_t>(o.threads))) {
    fail(kExitRuntime, "could not resize the thread pool to " + std::to_string(o.threads));
  }
  auto t0 = std::chrono::steady_clock::now();
  AlignedFile file;
  Bundled bundled;
  std::unique_ptr<Module> module;
  bool is_bpte = false;
  {
    std::ifstream probe(o.model, std::ios::binary);
    char head[8] = {};
    if (!probe) fail(kExitUsage, "cannot open " + o.model);
    probe.read(head, 8);
    is_bpte = probe.gcount() == 8 && std::memcmp(head + 4, "BP08", 4) == 0;
  }
  if (is_bpte) {
    file = read_file(o.model);
    bundled = read_bundled(file);
    module = std::make_unique<Module>(std::make_unique<BufferDataLoader>(bundled.program, bundled.program_size));
  } else {
    // Mmap is what an app uses for a model file: constants stay in the page cache, not the heap.
    module = std::make_unique<Module>(o.model, Module::LoadMode::Mmap);
  }
  check(module->load(), "loading " + o.model);
  double load_ms = ms_since(t0);
  auto meta = module->method_meta(o.method);
  if (!meta.ok()) check(meta.error(), "reading method '" + o.method + "'");
  // Sizes are informational for a bundled run (its cases carry their own tensors) but required
  // for --input, which feeds one float32 tensor and writes one output.
  std::vector<int32_t> in_sizes, out_sizes;
  auto ti = meta->num_inputs() >= 1 ? meta->input_tensor_meta(0) : Error::InvalidArgument;
  auto to = meta->num_outputs() >= 1 ? meta->output_tensor_meta(0) : Error::InvalidArgument;
  if (ti.ok()) in_sizes = to_vec(ti->sizes());
  if (to.ok()) out_sizes = to_vec(to->sizes());
  if (!o.input.empty()) {
    if (meta->num_inputs() != 1 || meta->num_outputs() != 1 || !ti.ok() || !to.ok()) {
      fail(kExitUsage, "--input needs a method with one tensor input and one tensor output");
    }
    if (ti->scalar_type() != ScalarType::Float) fail(kExitUsage, "the method's input is not float32");
  }
  t0 = std::chrono::steady_clock::now();
  check(module->load_method(o.method), "loading method '" + o.method + "'");
  double method_ms = ms_since(t0);
  emit("\"event\":\"load\",\"model\":" + json_str(o.model) + ",\"bundled\":" + (is_bpte ? "true" : "false") +
       ",\"method\":" + json_str(o.method) + ",\"arch\":" + json_str(arch_name()) + "," + cpu_features_json() +
       ",\"threads\":" + std::to_string(pool ? pool->get_thread_count() : 1) + ",\"load_ms\":" + json_num(load_ms) +
       ",\"method_load_ms\":" + json_num(method_ms) + ",\"input_sizes\":" + json_list(in_sizes) +
       ",\"output_sizes\":" + json_list(out_sizes) + ",\"num_outputs\":" + std::to_string(meta->num_outputs()));
  int rc = kExitOk;
  if (!o.input.empty()) run_input_file(*module, o, in_sizes, out_sizes);
  if (is_bpte && o.run_bundled) rc = run_bundled_cases(*module, bundled, o);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  try {
    return o.selftest ? selftest() : run(o);
  } catch (const Failure& f) {
    std::fprintf(stderr, "edgemix_runner: %s\n", f.what());
    return f.code;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgemix_runner: %s\n", e.what());
    return kExitRuntime;
  }
}
