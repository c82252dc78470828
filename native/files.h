// The files fastdit-run reads and writes: .npy arrays (np.save's format version 1.0, little-endian, C order),
// and a grid of the samples as binary PGM/PPM. Every problem with a file is a UsageError (exit status 2).
#pragma once

#include <ATen/ATen.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdit_run {

// A mistake in the arguments or the input files: one line on stderr, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw UsageError(what + " not found or unreadable: " + path);
  std::ostringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

struct NpyType {
  const char* descr;  // numpy's dtype string, little-endian
  at::ScalarType type;
  const char* name;
};
inline const NpyType FLOAT32{"<f4", at::kFloat, "float32"}, FLOAT64{"<f8", at::kDouble, "float64"},
    INT64{"<i8", at::kLong, "int64"};

// A .npy file (format version 1.0) of `expected` in C order, as np.save writes it; `what` names it in errors.
inline at::Tensor read_npy(const std::string& path, const std::string& what, const NpyType& expected) {
  std::string bytes = read_file(path, what + " file");
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0)
    throw UsageError(what + " " + path + ": not a .npy file");
  size_t header_size = bytes[6] == 1 ? static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8 : 0;
  size_t start = 10 + header_size;
  std::string header = bytes.substr(10, header_size);
  if (bytes[6] != 1 || header.find(std::string("'descr': '") + expected.descr + "'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos)
    throw UsageError(what + " " + path + ": expected " + expected.name + " in C order (np.save(path, x.astype(np." +
                     expected.name + ")))");
  std::vector<int64_t> shape;
  std::istringstream dims(header.substr(header.find('(') + 1, header.find(')') - header.find('(') - 1));
  for (std::string dim; std::getline(dims, dim, ',');)
    if (dim.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(dim));
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  if (bytes.size() != start + count * at::elementSize(expected.type))
    throw UsageError(what + " " + path + ": truncated");
  return at::from_blob(bytes.data() + start, shape, expected.type).clone();
}

// Written beside the target and renamed over it: a reader never sees a half-written file.
inline void write_atomic(const std::string& path, const std::string& bytes) {
  std::string temporary = path + ".tmp." + std::to_string(getpid());
  std::ofstream file(temporary, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  file.close();
  if (!file || std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    throw UsageError("cannot write " + path);
  }
}

inline std::string npy_bytes(const at::Tensor& samples) {
  std::string shape;
  for (int64_t dim : samples.sizes()) shape += std::to_string(dim) + ", ";
  shape = shape.substr(0, shape.size() - 2);
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + shape + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ') += '\n';  // the data starts 64-byte aligned
  std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  at::Tensor data = samples.contiguous();
  return bytes + header + std::string(static_cast<const char*>(data.data_ptr()), data.nbytes());
}

// fastdit.train.images.grid(fastdit.train.images.to_uint8(samples)) without the class ids: 2 px of black between tiles,
// small images enlarged to 64 px, as a binary PGM (grey) or PPM (RGB).
inline std::string grid_bytes(const at::Tensor& samples) {
  int64_t count = samples.size(0), channels = samples.size(1), height = samples.size(2), width = samples.size(3);
  int64_t scale = std::max<int64_t>(1, 64 / std::min(height, width));
  at::Tensor pixels = (127.5 * samples + 128.0).clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1});
  pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2);
  height *= scale, width *= scale;
  int64_t columns = std::min<int64_t>(static_cast<int64_t>(std::ceil(std::sqrt(count))), count);
  int64_t rows = (count + columns - 1) / columns;
  at::Tensor canvas = at::zeros({rows * (height + 2) + 2, columns * (width + 2) + 2, channels}, at::kByte);
  for (int64_t k = 0; k < count; ++k) {
    int64_t y = 2 + (k / columns) * (height + 2), x = 2 + (k % columns) * (width + 2);
    canvas.slice(0, y, y + height).slice(1, x, x + width).copy_(pixels[k]);
  }
  std::string header = std::string(channels == 1 ? "P5" : "P6") + "\n" + std::to_string(canvas.size(1)) + " " +
                       std::to_string(canvas.size(0)) + "\n255\n";
  return header + std::string(static_cast<const char*>(canvas.data_ptr()), canvas.nbytes());
}

}  // namespace fastdit_run
