// Groups the T*K routing slots by expert with a counting sort.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ktjax {

// Slots of expert e are sorted positions [offsets[e], offsets[e+1]); dropped slots (id -1) are left
// out, so offsets[E] is the number of kept slots S <= T*K.
struct Routing {
  std::vector<int64_t> offsets;  // [E+1]
  std::vector<int32_t> slot;     // [S] flat slot index t*K + k of each sorted position
  std::vector<int32_t> token;    // [S] token t of each sorted position
  std::vector<float> weight;     // [S] router weight of each sorted position

  int64_t count(int64_t e) const { return offsets[e + 1] - offsets[e]; }
  int64_t kept() const { return offsets.back(); }
};

// Returns an empty string on success, else a message naming the first out-of-range id.
inline std::string build_routing(const int32_t* ids, const float* weights, int64_t T, int64_t K,
                                 int64_t E, Routing* r) {
  r->offsets.assign(E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = ids[i];
    if (e < -1 || e >= E) {
      return "topk_ids[" + std::to_string(i / K) + ", " + std::to_string(i % K) + "] = " +
             std::to_string(e) + " is out of range: ids must be in [-1, " + std::to_string(E) +
             ") for " + std::to_string(E) + " experts (-1 drops the slot)";
    }
    if (e >= 0) ++r->offsets[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) r->offsets[e + 1] += r->offsets[e];
  const int64_t S = r->offsets[E];
  r->slot.resize(S);
  r->token.resize(S);
  r->weight.resize(S);
  std::vector<int64_t> fill(r->offsets.begin(), r->offsets.end() - 1);
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = ids[i];
    if (e < 0) continue;
    const int64_t p = fill[e]++;
    r->slot[p] = static_cast<int32_t>(i);
    r->token[p] = static_cast<int32_t>(i / K);
    r->weight[p] = weights[i];
  }
  return {};
}

}  // namespace ktjax
