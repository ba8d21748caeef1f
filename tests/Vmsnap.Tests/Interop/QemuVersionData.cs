using System.Reflection;
using Xunit.Sdk;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// Theory data for interop tests: each row once per QEMU version (<see cref="QemuInstall.Versions"/>), the version
/// as the first argument, so the display name says which QEMU ran (<c>T(version: "10.0", ...)</c>). The test
/// itself starts with <c>using var _ = QemuInstall.Use(version);</c>.
/// </summary>
internal static class QemuVersionData
{
    internal static IEnumerable<object?[]> Each(IEnumerable<object?[]> rows) =>
        from row in rows from version in All select (object?[])[version, .. row];

    private static IEnumerable<string> All => ((IEnumerable<object[]>)QemuInstall.Versions).Select(row => (string)row[0]);

    /// <summary>
    /// Runs <paramref name="check"/> once with each QEMU version in use, for a test whose QEMU part is a small check
    /// after costly work that does not depend on QEMU; a failure names the version.
    /// </summary>
    internal static void OnEachQemu(Action<string> check)
    {
        foreach (string version in All)
        {
            using var scope = QemuInstall.Use(version);
            try
            {
                check(version);
            }
            catch (Exception e)
            {
                throw new InvalidOperationException($"on QEMU {version}: {e.Message}", e);
            }
        }
    }
}

/// <summary><c>[Theory, EachQemu] void T(string version)</c>: once per QEMU version.</summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class EachQemuAttribute : DataAttribute
{
    /// <inheritdoc/>
    public override IEnumerable<object?[]> GetData(MethodInfo testMethod) => QemuVersionData.Each([[]]);
}

/// <summary>Like <see cref="InlineDataAttribute"/>, once per QEMU version, the version first.</summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = true)]
public sealed class QemuInlineDataAttribute(params object?[] data) : DataAttribute
{
    /// <inheritdoc/>
    public override IEnumerable<object?[]> GetData(MethodInfo testMethod) => QemuVersionData.Each([data]);
}

/// <summary>Like <see cref="MemberDataAttribute"/>, each row once per QEMU version, the version first.</summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = true)]
public sealed class QemuMemberDataAttribute(string memberName, params object?[] parameters) : MemberDataAttributeBase(memberName, parameters)
{
    /// <inheritdoc/>
    public override IEnumerable<object?[]> GetData(MethodInfo testMethod) => QemuVersionData.Each(base.GetData(testMethod));

    /// <inheritdoc/>
    protected override object?[] ConvertDataItem(MethodInfo testMethod, object? item) =>
        item as object?[] ?? throw new ArgumentException($"{MemberName} must give object[] rows, gave {item?.GetType().Name ?? "null"}");
}
