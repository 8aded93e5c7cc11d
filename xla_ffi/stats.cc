#include "stats.h"

namespace ktjax {

Stats& stats() {
  static Stats s;
  return s;
}

}  // namespace ktjax
