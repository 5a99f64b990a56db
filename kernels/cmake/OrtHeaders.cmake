# Locates the onnxruntime C/C++ headers (the PyPI wheels ship none).
#
#   onnxshrink_find_ort_headers(<out_var>)
#
# Order:
#   1. ONNXRUNTIME_INCLUDE_DIR (CMake variable, else environment variable) -
#      always wins; an invalid value is a hard error rather than a fallback.
#   2. A system copy (e.g. Debian's libonnxruntime-dev).
#   3. A per-user cache (${ONNXSHRINK_CACHE:-~/.cache/onnxshrink}/ort-headers)
#      filled once from Debian trixie's libonnxruntime-dev .deb with
#      `apt-get download` using a completely private apt state (own
#      sources.list, lists, cache and config), then `dpkg -x`. Nothing is
#      installed system-wide and nothing is written outside the cache dir.
#      Later builds reuse the cache without network access.
# The headers must include the lite custom-op API (onnxruntime >= 1.16).

set(_ONNXSHRINK_HOW_TO_FIX
    "set ONNXRUNTIME_INCLUDE_DIR=/path/to/dir/with/onnxruntime_cxx_api.h (onnxruntime >= 1.16), or install libonnxruntime-dev, or set ONNXSHRINK_NO_KERNELS=1 to build without the op library")

function(_onnxshrink_ort_headers_ok dir out_var)
  if(dir AND EXISTS "${dir}/onnxruntime_cxx_api.h" AND EXISTS "${dir}/onnxruntime_c_api.h"
     AND EXISTS "${dir}/onnxruntime_lite_custom_op.h")
    set(${out_var} TRUE PARENT_SCOPE)
  else()
    set(${out_var} FALSE PARENT_SCOPE)
  endif()
endfunction()

# Downloads and unpacks libonnxruntime-dev into <cache_dir>; sets <out_var>
# to the include dir on success, or to "" and <err_var> to the reason.
function(_onnxshrink_fetch_debian_headers cache_dir out_var err_var)
  set(${out_var} "" PARENT_SCOPE)
  find_program(_apt_get apt-get NO_CACHE)
  find_program(_dpkg dpkg NO_CACHE)
  if(NOT _apt_get OR NOT _dpkg)
    set(${err_var} "apt-get/dpkg not available for downloading libonnxruntime-dev" PARENT_SCOPE)
    return()
  endif()

  set(_suite "$ENV{ONNXSHRINK_DEBIAN_SUITE}")
  if(NOT _suite)
    set(_suite trixie)  # trixie ships onnxruntime 1.21 headers
  endif()
  set(_mirror "$ENV{ONNXSHRINK_DEBIAN_MIRROR}")
  if(NOT _mirror)
    set(_mirror "http://deb.debian.org/debian")
  endif()

  # Signatures: the InRelease file is verified against the Debian archive
  # keyring (bookworm's debian-archive-keyring already carries the trixie
  # keys), and the .deb is then checked against the hashes in the signed
  # index. There is no silent fallback to unverified downloads; only an
  # explicit ONNXSHRINK_APT_INSECURE=1 (for hosts whose keyring is too old or
  # absent) marks the source trusted=yes.
  set(_keyring "$ENV{ONNXSHRINK_DEBIAN_KEYRING}")
  if(NOT _keyring)
    set(_keyring /usr/share/keyrings/debian-archive-keyring.gpg)
  endif()
  if("$ENV{ONNXSHRINK_APT_INSECURE}" STREQUAL "1")
    set(_opts "trusted=yes")
    message(WARNING "onnxshrink: ONNXSHRINK_APT_INSECURE=1 - downloading ORT headers WITHOUT signature verification")
  elseif(EXISTS "${_keyring}")
    set(_opts "signed-by=${_keyring}")
  else()
    set(${err_var} "no Debian archive keyring at ${_keyring} to verify the download (install debian-archive-keyring)" PARENT_SCOPE)
    return()
  endif()

  set(_work "${cache_dir}/.apt-work")
  file(REMOVE_RECURSE "${_work}")
  file(MAKE_DIRECTORY "${_work}/state/lists/partial" "${_work}/cache/archives/partial" "${_work}/etc/apt.conf.d"
       "${_work}/etc/preferences.d" "${_work}/etc/trusted.gpg.d" "${_work}/dl" "${_work}/log")
  file(WRITE "${_work}/etc/sources.list" "deb [${_opts}] ${_mirror} ${_suite} main\n")
  file(WRITE "${_work}/etc/apt.conf" "")

  # Every apt path points into the private work dir; the host's apt.conf.d is
  # ignored too (docker images put cache-cleaning hooks there). Proxies from
  # the http_proxy environment variables still apply.
  set(_apt_opts
      -o "Dir::Etc=${_work}/etc"
      -o "Dir::Etc::main=${_work}/etc/apt.conf"
      -o "Dir::Etc::Parts=${_work}/etc/apt.conf.d"
      -o "Dir::Etc::SourceList=${_work}/etc/sources.list"
      -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::Etc::Preferences=${_work}/etc/preferences"
      -o "Dir::Etc::PreferencesParts=${_work}/etc/preferences.d"
      -o "Dir::Etc::Trusted=${_work}/etc/trusted.gpg"
      -o "Dir::Etc::TrustedParts=${_work}/etc/trusted.gpg.d"
      -o "Dir::State=${_work}/state"
      -o "Dir::State::status=/dev/null"
      -o "Dir::Cache=${_work}/cache"
      -o "Dir::Log=${_work}/log"
      -o "Debug::NoLocking=1"
      -o "APT::Sandbox::User=root"   # as root, the _apt user could not write into $HOME
      -o "Acquire::Languages=none"
      -o "Acquire::Retries=2"
      -o "Acquire::http::Timeout=30"
      -o "APT::Get::AllowUnauthenticated=false"
      -q)

  message(STATUS "onnxshrink: fetching libonnxruntime-dev (${_suite}) into ${cache_dir}")
  execute_process(COMMAND "${_apt_get}" ${_apt_opts} update
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err TIMEOUT 300)
  # apt-get update can exit 0 while reporting errors (e.g. a bad signature)
  # (it also only warns when the mirror is unreachable), so inspect the messages too.
  if(NOT _rc EQUAL 0 OR _err MATCHES "(^|\n)E: " OR _err MATCHES "NO_PUBKEY|not signed|Failed to fetch")
    # keep the first line only: the FATAL_ERROR message should stay readable
    string(REGEX REPLACE "\n.*" "" _err "${_err}")
    set(${err_var} "apt-get update (${_suite}) failed: ${_err}" PARENT_SCOPE)
    file(REMOVE_RECURSE "${_work}")
    return()
  endif()
  execute_process(COMMAND "${_apt_get}" ${_apt_opts} download libonnxruntime-dev
                  WORKING_DIRECTORY "${_work}/dl"
                  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err TIMEOUT 300)
  file(GLOB _debs "${_work}/dl/libonnxruntime-dev_*.deb")
  if(NOT _rc EQUAL 0 OR NOT _debs)
    string(REGEX REPLACE "\n.*" "" _err "${_err}")
    set(${err_var} "apt-get download libonnxruntime-dev failed: ${_err}" PARENT_SCOPE)
    file(REMOVE_RECURSE "${_work}")
    return()
  endif()
  list(GET _debs 0 _deb)

  # Unpack into a staging dir and rename into place, so an interrupted build
  # never leaves a half-filled cache that later builds would trust.
  set(_stage "${_work}/root")
  execute_process(COMMAND "${_dpkg}" -x "${_deb}" "${_stage}"
                  RESULT_VARIABLE _rc ERROR_VARIABLE _err)
  _onnxshrink_ort_headers_ok("${_stage}/usr/include/onnxruntime" _ok)
  if(NOT _rc EQUAL 0 OR NOT _ok)
    set(${err_var} "unpacking ${_deb} gave no usable headers: ${_err}" PARENT_SCOPE)
    file(REMOVE_RECURSE "${_work}")
    return()
  endif()
  get_filename_component(_deb_name "${_deb}" NAME)
  file(WRITE "${_stage}/usr/include/onnxruntime/.onnxshrink-source" "${_deb_name}\n")
  file(REMOVE_RECURSE "${cache_dir}/include")
  file(RENAME "${_stage}/usr/include" "${cache_dir}/include")
  file(REMOVE_RECURSE "${_work}")
  set(${out_var} "${cache_dir}/include/onnxruntime" PARENT_SCOPE)
endfunction()

function(onnxshrink_find_ort_headers out_var)
  # 1. explicit setting always wins
  set(_explicit "")
  if(ONNXRUNTIME_INCLUDE_DIR)
    set(_explicit "${ONNXRUNTIME_INCLUDE_DIR}")
  elseif(DEFINED ENV{ONNXRUNTIME_INCLUDE_DIR} AND NOT "$ENV{ONNXRUNTIME_INCLUDE_DIR}" STREQUAL "")
    set(_explicit "$ENV{ONNXRUNTIME_INCLUDE_DIR}")
  endif()
  if(_explicit)
    foreach(_cand "${_explicit}" "${_explicit}/onnxruntime")
      _onnxshrink_ort_headers_ok("${_cand}" _ok)
      if(_ok)
        message(STATUS "onnxshrink: ORT headers from ONNXRUNTIME_INCLUDE_DIR: ${_cand}")
        set(${out_var} "${_cand}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
    message(FATAL_ERROR "onnxshrink: ONNXRUNTIME_INCLUDE_DIR=${_explicit} has no onnxruntime_cxx_api.h + onnxruntime_lite_custom_op.h; ${_ONNXSHRINK_HOW_TO_FIX}")
  endif()

  # 2. system copy
  foreach(_cand /usr/include/onnxruntime /usr/local/include/onnxruntime /opt/onnxruntime/include
                /opt/homebrew/include/onnxruntime /usr/include /usr/local/include)
    _onnxshrink_ort_headers_ok("${_cand}" _ok)
    if(_ok)
      message(STATUS "onnxshrink: ORT headers from system: ${_cand}")
      set(${out_var} "${_cand}" PARENT_SCOPE)
      return()
    endif()
  endforeach()

  # 3. cache (fill it on first use)
  if(DEFINED ENV{ONNXSHRINK_CACHE} AND NOT "$ENV{ONNXSHRINK_CACHE}" STREQUAL "")
    set(_root "$ENV{ONNXSHRINK_CACHE}")
  elseif(DEFINED ENV{HOME} AND NOT "$ENV{HOME}" STREQUAL "")
    set(_root "$ENV{HOME}/.cache/onnxshrink")
  else()
    message(FATAL_ERROR "onnxshrink: no ORT headers found and neither ONNXSHRINK_CACHE nor HOME is set; ${_ONNXSHRINK_HOW_TO_FIX}")
  endif()
  set(_cache "${_root}/ort-headers")
  _onnxshrink_ort_headers_ok("${_cache}/include/onnxruntime" _ok)
  if(_ok)
    message(STATUS "onnxshrink: ORT headers from cache: ${_cache}/include/onnxruntime")
    set(${out_var} "${_cache}/include/onnxruntime" PARENT_SCOPE)
    return()
  endif()
  file(MAKE_DIRECTORY "${_cache}")
  _onnxshrink_fetch_debian_headers("${_cache}" _dir _why)
  if(_dir)
    message(STATUS "onnxshrink: ORT headers downloaded to cache: ${_dir}")
    set(${out_var} "${_dir}" PARENT_SCOPE)
    return()
  endif()
  string(REPLACE "\n" " | " _why "${_why}")
  message(FATAL_ERROR "onnxshrink: no onnxruntime headers (${_why}); ${_ONNXSHRINK_HOW_TO_FIX}")
endfunction()
