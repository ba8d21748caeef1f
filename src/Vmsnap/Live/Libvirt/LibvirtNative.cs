using System.Runtime.InteropServices;

namespace Vmsnap.Live.Libvirt;

/// <summary>
/// The part of libvirt's C API vmsnap uses (libvirt.so.0 and libvirt-qemu.so.0; a stable ABI): connections, domains, their QEMU
/// monitor (commands with file descriptors, events), snapshot metadata, and save-image restore. Pointers are opaque handles.
/// </summary>
internal static unsafe partial class LibvirtNative
{
    private const string Lib = "libvirt.so.0";
    private const string QemuLib = "libvirt-qemu.so.0";

    // virDomainState
    internal const int DomainRunning = 1, DomainPaused = 3, DomainShutoff = 5;

    // virDomainXMLFlags
    internal const uint XmlSecure = 1, XmlInactive = 2, XmlMigratable = 8;

    // virDomainSnapshotCreateFlags
    internal const uint SnapshotCreateRedefine = 1, SnapshotCreateCurrent = 2;

    // virDomainSnapshotDeleteFlags
    internal const uint SnapshotDeleteMetadataOnly = 2;

    // virDomainSaveRestoreFlags
    internal const uint SaveRunning = 2, SavePaused = 4;

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virConnectOpen(string? name);

    [LibraryImport(Lib)]
    internal static partial int virConnectClose(nint conn);

    [LibraryImport(Lib)]
    internal static partial int virConnectIsAlive(nint conn);

    [LibraryImport(Lib)]
    internal static partial nint virConnectGetURI(nint conn);

    [LibraryImport(Lib)]
    internal static partial int virConnectGetLibVersion(nint conn, out ulong version);

    [LibraryImport(Lib)]
    internal static partial int virConnectGetVersion(nint conn, out ulong version);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainLookupByName(nint conn, string name);

    [LibraryImport(Lib)]
    internal static partial int virDomainFree(nint domain);

    [LibraryImport(Lib)]
    internal static partial int virDomainGetState(nint domain, out int state, out int reason, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainIsActive(nint domain);

    [LibraryImport(Lib)]
    internal static partial nint virDomainGetXMLDesc(nint domain, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainDestroy(nint domain);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int virDomainRestoreFlags(nint conn, string from, string? dxml, uint flags);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainSnapshotCreateXML(nint domain, string xml, uint flags);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainSnapshotLookupByName(nint domain, string name, uint flags);

    [LibraryImport(Lib)]
    internal static partial nint virDomainSnapshotCurrent(nint domain, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainListAllSnapshots(nint domain, out nint* snapshots, uint flags);

    [LibraryImport(Lib)]
    internal static partial nint virDomainSnapshotGetName(nint snapshot);

    [LibraryImport(Lib)]
    internal static partial nint virDomainSnapshotGetXMLDesc(nint snapshot, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainSnapshotDelete(nint snapshot, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainSnapshotFree(nint snapshot);

    // virDomainMigrateFlags
    internal const uint MigrateLive = 1, MigratePostcopy = 1 << 15;

    // virTypedParameterType
    internal const int TypedParamString = 7;

    /// <summary>virTypedParameter: an 80-byte name, the value's type, and the value (here always a string).</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct TypedParameter
    {
        public fixed byte Field[80];
        public int Type;
        public nint Value;
    }

    /// <summary>
    /// The destination's first step of libvirt's migration protocol (version 3 with parameters): libvirt starts the domain's QEMU
    /// waiting for an incoming migration. Exported from libvirt.so.0 under a version of its own each release (LIBVIRT_PRIVATE_x);
    /// the remote protocol behind it is stable, as migration between libvirt releases needs.
    /// </summary>
    [LibraryImport(Lib)]
    internal static partial int virDomainMigratePrepare3Params(nint dconn, TypedParameter* parameters, int count, byte* cookieIn, int cookieInLength,
        out nint cookieOut, out int cookieOutLength, out nint uriOut, uint flags);

    /// <summary>The destination's last step: the domain runs (or, cancelled, its QEMU is stopped). Returns the domain, or 0.</summary>
    [LibraryImport(Lib)]
    internal static partial nint virDomainMigrateFinish3Params(nint dconn, TypedParameter* parameters, int count, byte* cookieIn, int cookieInLength,
        out nint cookieOut, out int cookieOutLength, uint flags, int cancelled);

    [LibraryImport(Lib)]
    internal static partial nint virGetLastErrorMessage();

    [LibraryImport(Lib)]
    internal static partial void virSetErrorFunc(nint userData, delegate* unmanaged<nint, nint, void> handler);

    [LibraryImport(Lib)]
    internal static partial int virEventRegisterDefaultImpl();

    [LibraryImport(Lib)]
    internal static partial int virEventRunDefaultImpl();

    [LibraryImport(QemuLib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int virDomainQemuMonitorCommandWithFiles(nint domain, string cmd, uint ninfiles, int* infiles,
        uint* noutfiles, int** outfiles, out nint result, uint flags);

    /// <summary>void (*)(virConnectPtr, virDomainPtr, const char *event, long long seconds, unsigned int micros, const char *details, void *opaque)</summary>
    [LibraryImport(QemuLib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int virConnectDomainQemuMonitorEventRegister(nint conn, nint domain, string? eventName,
        delegate* unmanaged<nint, nint, byte*, long, uint, byte*, nint, void> callback, nint opaque, nint freeCallback, uint flags);

    [LibraryImport(QemuLib)]
    internal static partial int virConnectDomainQemuMonitorEventDeregister(nint conn, int callbackId);

    [LibraryImport("libc")]
    internal static partial void free(nint pointer);

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    internal static partial int mkfifo(string path, uint mode);

    /// <summary>fcntl's F_SETPIPE_SZ: a pipe's buffer size (Linux).</summary>
    internal const int F_SETPIPE_SZ = 1031;

    [LibraryImport("libc", SetLastError = true)]
    internal static partial int fcntl(nint fd, int command, int argument);

    internal const int F_GETFL = 3;
    internal const int F_SETFL = 4;
    internal const int O_RDONLY = 0;
    internal const int O_NONBLOCK = 0x800;

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    internal static partial int open(string path, int flags);

    /// <summary>A string libvirt allocated for the caller: copied, then freed.</summary>
    internal static string? TakeString(nint p)
    {
        if (p == 0) return null;
        try { return Marshal.PtrToStringUTF8(p); }
        finally { free(p); }
    }

    /// <summary>The text of libvirt's last error on this thread.</summary>
    internal static string LastError() => Marshal.PtrToStringUTF8(virGetLastErrorMessage()) ?? "unknown libvirt error";
}
