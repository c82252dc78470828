// fastdit-run: DDIM sampling in C++ from a `fastdit export` package, with no Python.
//
// MODEL.pt2 (AOTInductor) is one guided denoiser call (x, t, y) -> eps; its metadata holds the shapes, and
// MODEL.timesteps.npy and MODEL.ddim.npy beside it hold the schedule and the per-step coefficients that
// fastdit.diffusion.samplers.DDIM (eta 0) computed. The loop below applies them in the same fp32 arithmetic as
// fastdit.sample, so for the same noise and labels the result is fastdit.sample(..., sampler="ddim")'s.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "files.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace fastdit_run {

const char* USAGE = R"(usage: fastdit-run MODEL.pt2 --out OUT.npy [--labels ID ...] [--seed S | --noise NOISE.npy]
                   [--image GRID.pgm]

Sample class-conditional images with DDIM from a package written by `fastdit export --out MODEL.pt2`
(the shapes and guidance are in the package's metadata; the DDIM schedule is read from MODEL.timesteps.npy
and MODEL.ddim.npy beside it).

  MODEL.pt2           the AOTInductor package
  --out OUT.npy       the samples, float32 (N, C, H, W) (pixels in [-1, 1], or latents)
  --labels ID ...     one class id per image (default: 0, 1, 2, ... modulo the number of classes, one batch,
                      or as many as --noise has images); any number, run in batches of the exported size
  --seed S            image k starts from the noise that fastdit.sample(..., seed=S) and `fastdit sample
                      --seed S` draw for image k (default 0), so the same labels give the same images
  --noise NOISE.npy   the initial noise x_T instead, float32 (N, C, H, W), one image per label
  --image GRID.pgm    pixel-space models: also a grid of the images (binary PGM for 1 channel, PPM for 3)
  -h, --help          this help

Errors are one line on stderr: exit status 2 for bad arguments or files, 1 when the model fails to run.
)";

// --- what `fastdit export` wrote: scalars in the package's metadata, the schedule as .npy files beside it ---

const int FORMAT_VERSION = 2;  // fastdit.cli.export.FORMAT_VERSION; 1 wrote a JSON file instead

struct Export {
  int64_t batch_size, channels, size, num_classes;
  bool pixels;
  std::string device;
  at::Tensor timesteps;     // int64 (S,): the model's timestep at each step, in sampling order
  at::Tensor coefficients;  // float64 (S, 2): x_prev = a x + b eps, fastdit.diffusion.samplers.DDIM's rows (eta 0)
};

using Metadata = std::unordered_map<std::string, std::string>;

std::string entry(const Metadata& metadata, const std::string& key, const std::string& package) {
  auto found = metadata.find(key);
  if (found == metadata.end())
    throw UsageError(package + ": no \"" + key + "\" in the package's metadata (re-export it with fastdit export)");
  return found->second;
}

int64_t positive_entry(const Metadata& metadata, const std::string& key, const std::string& package) {
  std::string text = entry(metadata, key, package);
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
  }
  if (text.empty() || used != text.size() || value < 1)
    throw UsageError(package + ": metadata \"" + key + "\": expected an integer >= 1, got '" + text + "'");
  return value;
}

// The package's metadata is read without loading its compiled model, so that bad arguments fail fast.
Export read_export(const std::string& package) {
  Metadata metadata;
  try {
    metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, "model");
  } catch (const std::exception& error) {
    std::string message = error.what();
    throw UsageError("cannot read package " + package + ": " + message.substr(0, message.find('\n')));
  }
  auto found = metadata.find("format");
  if (found == metadata.end() || found->second != "fastdit-export")
    throw UsageError(package + ": not written by fastdit export (its metadata has no \"format\": \"fastdit-export\")");
  if (entry(metadata, "format_version", package) != std::to_string(FORMAT_VERSION))
    throw UsageError(package + ": format_version " + entry(metadata, "format_version", package) +
                     "; this runner reads format_version " + std::to_string(FORMAT_VERSION) +
                     " (export and build the runner from the same fastdit)");
  std::string pixels = entry(metadata, "pixels", package);
  if (pixels != "true" && pixels != "false")
    throw UsageError(package + ": metadata \"pixels\": expected true or false, got '" + pixels + "'");
  Export e{positive_entry(metadata, "batch_size", package), positive_entry(metadata, "in_channels", package),
           positive_entry(metadata, "input_size", package), positive_entry(metadata, "num_classes", package),
           pixels == "true", entry(metadata, "device", package)};
  int64_t steps = positive_entry(metadata, "steps", package);
  std::string stem = package.substr(0, package.size() - 4);  // fastdit.cli.export.schedule_paths
  std::string timesteps_path = stem + ".timesteps.npy", coefficients_path = stem + ".ddim.npy";
  for (const std::string& path : {timesteps_path, coefficients_path})
    if (access(path.c_str(), R_OK) != 0)
      throw UsageError(path + " not found or unreadable (fastdit export writes it beside " + package + ")");
  e.timesteps = read_npy(timesteps_path, "DDIM timesteps", INT64);
  e.coefficients = read_npy(coefficients_path, "DDIM coefficients", FLOAT64);
  if (e.timesteps.sizes().vec() != std::vector<int64_t>{steps})
    throw UsageError(timesteps_path + ": expected shape (" + std::to_string(steps) + ",) for the package's " +
                     std::to_string(steps) + " steps, got " + c10::str(e.timesteps.sizes()));
  if (e.coefficients.sizes().vec() != std::vector<int64_t>{steps, 2})
    throw UsageError(coefficients_path + ": expected shape (" + std::to_string(steps) + ", 2) for the package's " +
                     std::to_string(steps) + " steps, got " + c10::str(e.coefficients.sizes()));
  return e;
}

// --- noise: fastdit.diffusion.sampling.ImageNoise -----------------------------------------------------------------

// numpy's SeedSequence([seed, index]).generate_state(2) as one 64-bit seed: fastdit.diffusion.sampling.image_seed.
uint64_t image_seed(uint64_t seed, uint64_t index) {
  std::vector<uint32_t> entropy;
  for (uint64_t value : {seed, index}) {  // each integer as its 32-bit words, least significant first
    do entropy.push_back(static_cast<uint32_t>(value)), value >>= 32;
    while (value);
  }
  uint32_t hash_const = 0x43b0d7e5;
  auto hashmix = [&](uint32_t value) {
    value ^= hash_const;
    hash_const *= 0x931e8875;
    value *= hash_const;
    return value ^ (value >> 16);
  };
  auto mix = [](uint32_t x, uint32_t y) {
    uint32_t result = 0xca01f9dd * x - 0x4973f715 * y;
    return result ^ (result >> 16);
  };
  uint32_t pool[4];
  for (size_t i = 0; i < 4; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0);
  for (size_t source = 0; source < 4; ++source)
    for (size_t target = 0; target < 4; ++target)
      if (source != target) pool[target] = mix(pool[target], hashmix(pool[source]));
  for (size_t source = 4; source < entropy.size(); ++source)
    for (size_t target = 0; target < 4; ++target) pool[target] = mix(pool[target], hashmix(entropy[source]));
  uint32_t state[2], output_const = 0x8b51f9dd;
  for (size_t i = 0; i < 2; ++i) {
    uint32_t value = pool[i] ^ output_const;
    output_const *= 0x58f38ded;
    value *= output_const;
    state[i] = value ^ (value >> 16);
  }
  return (static_cast<uint64_t>(state[0]) << 32) | state[1];
}

// x_T of images 0..count-1: each from its own CPU generator, as torch.Generator().manual_seed(image_seed(seed, k)).
at::Tensor seeded_noise(uint64_t seed, int64_t count, const Export& e) {
  std::vector<at::Tensor> images;
  for (int64_t k = 0; k < count; ++k) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(image_seed(seed, k));
    images.push_back(at::randn({e.channels, e.size, e.size}, generator, at::kFloat));
  }
  return at::stack(images);
}

// --- sampling --------------------------------------------------------------------------------------------------

// Labels and noise are run in batches of the package's static batch size; the last batch is padded (each image is
// computed independently of the others in its batch, so padding changes nothing).
at::Tensor sample(torch::inductor::AOTIModelPackageLoader& loader, const Export& e, const std::vector<int64_t>& labels,
                  const at::Tensor& noise) {
  at::Device device(e.device);
  // Rounded to fp32 as fastdit.diffusion.sampling rounds the solver's float64 table before its steps.
  at::Tensor coefficients = e.coefficients.to(device, at::kFloat);
  int64_t total = static_cast<int64_t>(labels.size()), steps = e.timesteps.size(0);
  std::vector<at::Tensor> batches;
  for (int64_t start = 0; start < total; start += e.batch_size) {
    int64_t count = std::min(e.batch_size, total - start);
    at::Tensor x = at::zeros({e.batch_size, e.channels, e.size, e.size}, at::kFloat);
    x.slice(0, 0, count).copy_(noise.slice(0, start, start + count));
    at::Tensor y = at::zeros({e.batch_size}, at::kLong);
    for (int64_t k = 0; k < count; ++k) y[k] = labels[start + k];
    x = x.to(device), y = y.to(device);
    at::Tensor t = at::empty({e.batch_size}, at::TensorOptions().device(device).dtype(at::kLong));
    for (int64_t i = 0; i < steps; ++i) {
      t.fill_(e.timesteps[i].item<int64_t>());
      at::Tensor eps = loader.run({x, t, y})[0];
      x = coefficients[i][0] * x + coefficients[i][1] * eps;
    }
    batches.push_back(x.slice(0, 0, count).cpu());
  }
  return at::cat(batches);
}

struct Arguments {
  std::string package, out, noise, image;
  std::vector<int64_t> labels;
  uint64_t seed = 0;
  bool has_seed = false;
};

int64_t parse_integer(const std::string& flag, const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
  }
  if (text.empty() || used != text.size()) throw UsageError(flag + ": expected an integer, got '" + text + "'");
  return value;
}

Arguments parse_arguments(int argc, char** argv) {
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + ": expected a value");
      return argv[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::cout << USAGE;
      std::exit(0);
    } else if (flag == "--out") {
      args.out = value();
    } else if (flag == "--noise") {
      args.noise = value();
    } else if (flag == "--image") {
      args.image = value();
    } else if (flag == "--seed") {
      int64_t seed = parse_integer(flag, value());
      if (seed < 0) throw UsageError("--seed: expected an integer >= 0, got " + std::to_string(seed));
      args.seed = static_cast<uint64_t>(seed), args.has_seed = true;
    } else if (flag == "--labels") {
      while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0)
        args.labels.push_back(parse_integer(flag, argv[++i]));
      if (args.labels.empty()) throw UsageError("--labels: expected one or more class ids");
    } else if (flag.rfind("-", 0) == 0) {
      throw UsageError("unknown option " + flag);
    } else if (args.package.empty()) {
      args.package = flag;
    } else {
      throw UsageError("unexpected argument " + flag + " (one MODEL.pt2 only)");
    }
  }
  if (args.package.empty()) throw UsageError("no package given: fastdit-run MODEL.pt2 --out OUT.npy (see --help)");
  if (args.out.empty()) throw UsageError("--out: required (the .npy file to write)");
  if (!args.noise.empty() && args.has_seed) throw UsageError("--noise and --seed: pass one, not both");
  return args;
}

int run(int argc, char** argv) {
  Arguments args = parse_arguments(argc, argv);
  if (args.package.size() < 4 || args.package.compare(args.package.size() - 4, 4, ".pt2") != 0)
    throw UsageError("expected a package ending in .pt2 (fastdit export --out MODEL.pt2), got " + args.package);
  if (access(args.package.c_str(), R_OK) != 0) throw UsageError("package not found or unreadable: " + args.package);
  Export e = read_export(args.package);
  if (!args.image.empty() && !e.pixels)
    throw UsageError("--image: this model samples latents (" + std::to_string(e.channels) +
                     " channels), not pixels; decode OUT.npy with the VAE instead");

  at::Tensor noise;
  if (!args.noise.empty()) {
    noise = read_npy(args.noise, "--noise", FLOAT32);
    bool fits = noise.dim() == 4 && noise.size(0) > 0 && noise.size(1) == e.channels && noise.size(2) == e.size &&
                noise.size(3) == e.size;
    if (!fits)
      throw UsageError("--noise: expected shape (N, " + std::to_string(e.channels) + ", " + std::to_string(e.size) +
                       ", " + std::to_string(e.size) + "), got " + c10::str(noise.sizes()));
    if (!args.labels.empty() && static_cast<int64_t>(args.labels.size()) != noise.size(0))
      throw UsageError("--labels: " + std::to_string(args.labels.size()) + " labels for " +
                       std::to_string(noise.size(0)) + " noise images; pass one label per image");
  }
  if (args.labels.empty()) {
    int64_t count = noise.defined() ? noise.size(0) : e.batch_size;
    for (int64_t k = 0; k < count; ++k) args.labels.push_back(k % e.num_classes);
  }
  for (int64_t label : args.labels)
    if (label < 0 || label >= e.num_classes)
      throw UsageError("--labels: class ids must be in [0, " + std::to_string(e.num_classes - 1) + "] (the model has " +
                       std::to_string(e.num_classes) + " classes), got " + std::to_string(label));
  if (!noise.defined()) noise = seeded_noise(args.seed, static_cast<int64_t>(args.labels.size()), e);

  auto started = std::chrono::steady_clock::now();
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(args.package);
  } catch (const std::exception& error) {
    std::string message = error.what();
    throw UsageError("cannot load package " + args.package + ": " + message.substr(0, message.find('\n')));
  }
  at::Tensor samples = sample(*loader, e, args.labels, noise);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  write_atomic(args.out, npy_bytes(samples));
  if (!args.image.empty()) write_atomic(args.image, grid_bytes(samples));
  std::printf("fastdit-run: wrote %s (%lld images, ddim %lld steps, %.2f s)\n", args.out.c_str(),
              static_cast<long long>(samples.size(0)), static_cast<long long>(e.timesteps.size(0)), seconds);
  return 0;
}

}  // namespace fastdit_run

int main(int argc, char** argv) {
  try {
    return fastdit_run::run(argc, argv);
  } catch (const fastdit_run::UsageError& error) {
    std::cerr << "fastdit-run: error: " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::string message = error.what();
    std::cerr << "fastdit-run: error: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  }
}
